"""The daemon: wires the cache, the speaker encoder, the engine, the library, the watcher and the server.

Start order: cache -> encoder -> engine (loaded and warmed) -> library worker -> watcher
(observer first, then the start-up reconcile, so no event falls between the two) -> sockets
bound -> the plugins' front doors (``voiced_serve``) -> ``voiced_startup`` -> READY. Stop order is the reverse: stop taking requests, finish those in flight
(bounded), stop watching, stop preparing, close the cache last so every finished
preparation is on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

import psutil

from voiced import __version__
from voiced.store import ArtifactStore, TieredStore, open_store
from voiced.config import Config, ensure_dirs, load_config
from voiced.encoder import SpeakerEncoder
from voiced.engines import Engine
from voiced.errors import VoicedError
from voiced.library import Library, VoiceState
from voiced.notify import Notifier, WatchdogPinger
from voiced.hooks import PluginHost
from voiced.protocol import VOICE_FAILED, VOICE_NOT_FOUND, VOICE_NOT_READY, ProtocolError
from voiced.security import check_endpoints_free
from voiced.server import Server
from voiced.speech import Speech
from voiced.watcher import FolderWatcher

log = logging.getLogger(__name__)


def create_engine(config: Config, encoder: SpeakerEncoder | None, plugins: PluginHost | None = None) -> Engine:
    """The configured engine (registered by a plugin; built-in: kokoro), constructed but not loaded."""
    plugins = plugins or PluginHost(config.plugins, source=config.source)
    return plugins.create_engine(config.engine, config.cache.dir, encoder)


class Daemon:
    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.started_at = time.time()
        self.cache: ArtifactStore | None = None
        self.encoder: SpeakerEncoder | None = None
        self.engine: Engine | None = None
        self.library: Library | None = None
        self.watcher: FolderWatcher | None = None
        self.server: Server | None = None
        self.plugins: PluginHost | None = None
        self.pinger: WatchdogPinger | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the measurement

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        config = self.config
        ensure_dirs(config)
        # plugins first: a bad plugin or setting fails before minutes of model loading
        self.plugins = PluginHost(config.plugins, source=config.source)
        check_endpoints_free(config.server.endpoints)  # a second daemon on the same socket fails now
        self.cache = open_store(config.cache.dir, config.cache.size_limit_bytes, config.cache.shared_dir)
        if config.cache.shared_dir:
            log.info("artefacts shared through %s; %s is this machine's copy", config.cache.shared_dir, config.cache.dir)
        self.notifier.status("loading the speaker encoder")
        started = time.monotonic()
        self.encoder = SpeakerEncoder.from_config(config.encoder)
        log.info("speaker encoder %s@%s on %s", self.encoder.model_id, self.encoder.version, self.encoder.device)
        self.notifier.status(f"loading the {config.engine.name} engine")
        self.engine = create_engine(config, self.encoder, self.plugins)
        self.engine.load(config.engine.device)
        log.info("engine %s@%s loaded and warm in %.1fs", self.engine.name, self.engine.version, time.monotonic() - started)
        if config.cluster.address:
            from voiced.cluster import ClusterEngine

            self.notifier.status(f"starting synthesis replicas on {config.cluster.address}")
            cluster = ClusterEngine(self.engine, config)
            cluster.start()
            self.engine = cluster  # type: ignore[assignment]
        self.library = Library(
            config.voices, self.cache, self.encoder, engine=self.engine, preprocess=config.encoder.preprocess,
            stage_budget_s=config.engine.refine_budget_s, listeners=[self.plugins.voice_event],
            # the cluster's preparers each take a stage, and one more worker keeps new files urgent
            workers=config.cluster.preparers + 1 if config.cluster.address and config.cluster.preparers else 1,
        )
        server_config = config.server
        if config.cluster.address:  # a thread per request in flight on the cluster: they only wait
            server_config = dataclasses.replace(server_config, synthesis_threads=max(
                server_config.synthesis_threads, config.cluster.max_replicas * config.cluster.requests_per_replica))
        self.server = Server(server_config, self, Speech(self.engine, self.plugins),
                             where=str(config.source) if config.source else "config")
        if not (config.cluster.address and config.cluster.preparers):
            # stages here give way to requests here; the cluster's preparers have their own machines
            self.library.set_external_demand(lambda: self.server is not None and self.server.queue_depth() > 0)
        self.library.start()
        self.watcher = FolderWatcher(self.library, config.voices)
        self.watcher.start()
        self.server.start()
        self.plugins.serve(self.server)
        self.plugins.startup({
            "version": __version__,
            "pid": os.getpid(),
            "endpoints": list(self.server.endpoints),
            "engine": f"{self.engine.name}@{self.engine.version}",
            "device": getattr(self.engine, "device", "cpu"),
            "sample_rate": self.engine.sample_rate,
            "voices_dir": str(config.voices.dir),
            "cache_dir": str(config.cache.dir),
            "config": str(config.source) if config.source else None,
        })
        self.notifier.ready(self.status_line())
        interval = self.notifier.watchdog_interval()
        if interval:
            stall = max(2 * interval, 5.0)
            self.pinger = WatchdogPinger(self.notifier, lambda: self.server is not None and self.server.healthy(stall))
            self.pinger.start()
        log.info("voiced %s ready: voices from %s, listening on %s", __version__, config.voices.dir,
                 ", ".join(self.server.endpoints))

    def stop(self) -> None:
        self.notifier.stopping()
        if self.server is not None:
            self.server.stop_accepting()
            if not self.server.drain(self.config.server.stop_timeout_s):
                log.warning("requests still in flight after %.1fs; stopping anyway", self.config.server.stop_timeout_s)
        if self.pinger is not None:
            self.pinger.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.library is not None:
            self.library.stop(timeout=self.config.server.stop_timeout_s)
        if self.server is not None:
            self.server.stop()
        if self.plugins is not None:
            self.plugins.shutdown()
        stop_engine = getattr(self.engine, "stop", None)
        if callable(stop_engine):  # the cluster's replicas
            stop_engine()
        if self.cache is not None:
            try:
                self.cache.collect_garbage(self.config.voices.rename_grace_s)
            except VoicedError as exc:
                log.warning("cache garbage collection at exit failed: %s", exc)
            self.cache.close()
        if self.library is not None:
            self.library.files.close()
        self.notifier.close()
        log.info("voiced stopped")

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def run_forever(self) -> None:
        """Block until asked to stop; meanwhile reload on request, let the engine tidy up, collect
        garbage, update STATUS=."""
        gc_every = max(1.0, self.config.voices.rename_grace_s / 2)
        next_gc = time.monotonic() + gc_every
        last_line = gc_problem = idle_problem = ""
        while not self._stop.wait(timeout=1.0):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self.engine is not None:
                try:
                    self.engine.idle()
                    idle_problem = ""
                except Exception as exc:  # noqa: BLE001 - a plugin engine's housekeeping must not stop the daemon
                    if str(exc) != idle_problem:
                        log.warning("engine housekeeping failed: %s", exc)
                    idle_problem = str(exc)
            line = self.status_line()
            if line != last_line:
                self.notifier.status(line)
                last_line = line
            if time.monotonic() >= next_gc and self.cache is not None:
                next_gc = time.monotonic() + gc_every
                try:
                    self.cache.collect_garbage(self.config.voices.rename_grace_s)
                    if gc_problem:
                        log.info("cache garbage collection works again")
                    gc_problem = ""
                except VoicedError as exc:
                    if str(exc) != gc_problem:  # once per distinct problem, not every second
                        log.warning("cache garbage collection failed: %s", exc)
                    gc_problem = str(exc)
                except Exception:
                    log.exception("cache garbage collection failed")
                if self.library is not None:
                    try:
                        self.library.retry_unsaved()
                    except Exception:
                        log.exception("storing results the cache refused earlier failed")

    def reload(self) -> None:
        """Re-read the config file and rescan the folder (SIGHUP or the reload op)."""
        self.notifier.reloading()
        try:
            fresh = load_config(self.config.source)
        except VoicedError as exc:
            log.error("reload: keeping the running configuration: %s", exc)
        else:
            for section in ("voices", "cache", "encoder", "engine", "server", "plugins"):
                if getattr(fresh, section) != getattr(self.config, section):
                    log.warning("reload: [%s] changed; restart the daemon to apply it", section)
            logging.getLogger().setLevel(fresh.log.level.upper())
        if self.server is not None:
            try:
                self.server.reload_keys()
            except Exception as exc:  # keep the keys already loaded
                log.error("reload: cannot re-read the CURVE client keys: %s", exc)
        if self.watcher is not None:
            self.watcher.rescan()
        self.notifier.ready(self.status_line())
        log.info("reloaded")

    # ------------------------------------------------------------------ the server's backend

    def voices(self) -> list[dict[str, Any]]:
        assert self.library is not None
        return self.library.voices()

    def _voice(self, name: str) -> Any:
        assert self.library is not None
        voice = self.library.get(name)
        if voice is None:
            raise ProtocolError(VOICE_NOT_FOUND, f"no voice named {name[:200]!r}")
        if voice.state is VoiceState.FAILED:
            raise ProtocolError(VOICE_FAILED, f"voice {name!r} failed: {voice.error}", reason=voice.error)
        return voice

    def voice_for_synthesis(self, name: str) -> tuple[dict[str, Any], Any] | None:
        assert self.library is not None
        voice = self._voice(name)
        if voice.state is not VoiceState.READY:
            return None
        found = self.library.conditioning(name)
        if found is None:  # lost from the cache: the library is preparing it again
            return None
        stage, conditioning = found
        return {**voice.to_dict(), "stage": stage}, conditioning

    def embed(self, name: str) -> dict[str, Any]:
        assert self.library is not None
        voice = self._voice(name)
        embedding = self.library.embedding(name)
        if embedding is None:
            raise ProtocolError(VOICE_NOT_READY, f"voice {name!r} is {voice.state.value}", state=voice.state.value)
        return {
            "voice": voice.name,
            "state": voice.state.value,
            "sha256": voice.sha256,
            "embedding": [float(x) for x in embedding],
        }

    def status(self) -> dict[str, Any]:
        assert self.library is not None and self.cache is not None and self.engine is not None
        memory = self._process.memory_info()
        cache = self.cache.stats()
        lookups = cache.hits + cache.misses
        status: dict[str, Any] = {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "pid": os.getpid(),
            "device": getattr(self.engine, "device", "cpu"),
            "model": f"{self.engine.name}@{self.engine.version}",
            "encoder": {"model": f"{self.encoder.model_id}@{self.encoder.version}", "device": str(self.encoder.device)}
            if self.encoder else None,
            "voices": self.library.counts(),
            "preparation_queue": self.library.queue_depth(),
            # files still being written into the folder: voices to come
            "settling": self.watcher.pending_settle() if self.watcher is not None else 0,
            "rss_bytes": memory.rss,
            "cpu_percent": self._process.cpu_percent(None),
            "gpu_memory_bytes": _gpu_memory(),
            "cache": {
                "entries": cache.entries,
                "bytes": cache.bytes,
                "size_limit_bytes": cache.size_limit_bytes,
                "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
            },
        }
        summary = getattr(self.engine, "summary", None)
        if callable(summary):
            status["cluster"] = summary()
        if isinstance(self.cache, TieredStore):
            status["cache"]["shared"] = {"dir": str(self.cache.shared.directory), "hits": self.cache.shared_hits()}
        if self.plugins is not None:
            status["plugins"] = self.plugins.status()
        if self.server is not None:
            summary = self.server.summary()
            status["queue"] = summary.pop("queue")
            status["requests"] = summary
        return status

    def status_line(self) -> str:
        """One line for systemd's STATUS= (and `systemctl status`)."""
        if self.library is None:
            return "starting"
        counts = self.library.counts()
        parts = [f"{counts['ready']} voices ready"]
        for state in ("preparing", "pending", "failed"):
            if counts[state]:
                parts.append(f"{counts[state]} {state}")
        parts.append(f"queue {self.server.queue_depth() if self.server else 0}")
        return ", ".join(parts)


def _gpu_memory() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.memory_allocated())
    except Exception:  # status must answer whatever the GPU stack does
        return None
    return None


def serve(config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; SIGHUP reloads."""
    daemon = Daemon(config)
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    try:
        daemon.start()
        daemon.run_forever()
    finally:
        daemon.stop()
    return 0
