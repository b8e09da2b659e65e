"""The daemon: wires the cache, the speaker encoder, the library and the folder watcher.

Start order: cache -> encoder (loaded once) -> library worker -> watcher (observer first,
then the start-up reconcile, so no event falls between the two). Stop order is the reverse,
and the cache is closed last so every finished preparation is on disk.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from voiced import __version__
from voiced.cache import Cache
from voiced.config import Config, ensure_dirs, load_config
from voiced.encoder import SpeakerEncoder
from voiced.library import Library
from voiced.watcher import FolderWatcher

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.cache: Cache | None = None
        self.encoder: SpeakerEncoder | None = None
        self.library: Library | None = None
        self.watcher: FolderWatcher | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()

    def start(self) -> None:
        config = self.config
        ensure_dirs(config)
        limit = int(config.cache.size_limit_mb * 1024 * 1024) or None
        self.cache = Cache(config.cache.dir, size_limit_bytes=limit)
        started = time.monotonic()
        self.encoder = SpeakerEncoder(
            device=config.encoder.device,
            weights_path=config.encoder.weights or None,
            threads=config.encoder.threads or None,
        )
        log.info(
            "speaker encoder %s@%s loaded on %s in %.2fs",
            self.encoder.model_id, self.encoder.version, self.encoder.device, time.monotonic() - started,
        )
        self.library = Library(config.voices, self.cache, self.encoder, preprocess=config.encoder.preprocess)
        self.library.start()
        self.watcher = FolderWatcher(self.library, config.voices)
        self.watcher.start()
        log.info("voiced %s serving voices from %s", __version__, config.voices.dir)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.library is not None:
            self.library.stop(timeout=self.config.server.stop_timeout_s)
        if self.cache is not None:
            self.cache.collect_garbage(self.config.voices.rename_grace_s)
            self.cache.close()
        log.info("voiced stopped")

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def status(self) -> dict[str, Any]:
        assert self.library is not None and self.cache is not None
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "voices": self.library.counts(),
            "queue": self.library.queue_depth(),
            "cache": self.cache.stats().__dict__,
        }

    def run_forever(self) -> None:
        """Block until asked to stop; meanwhile reload on request and collect cache garbage."""
        gc_every = max(1.0, self.config.voices.rename_grace_s / 2)
        next_gc = time.monotonic() + gc_every
        while not self._stop.wait(timeout=min(1.0, max(0.0, next_gc - time.monotonic()))):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if time.monotonic() >= next_gc and self.cache is not None:
                next_gc = time.monotonic() + gc_every
                try:
                    self.cache.collect_garbage(self.config.voices.rename_grace_s)
                except Exception:
                    log.exception("cache garbage collection failed")

    def reload(self) -> None:
        """Re-read the config file and rescan the folder (SIGHUP). Settings that need a restart say so."""
        try:
            fresh = load_config(self.config.source)
        except Exception as exc:
            log.error("reload: keeping the running configuration: %s", exc)
        else:
            for section in ("voices", "cache", "encoder", "engine", "server"):
                if getattr(fresh, section) != getattr(self.config, section):
                    log.warning("reload: [%s] changed; restart the daemon to apply it", section)
            logging.getLogger().setLevel(fresh.log.level.upper())
        if self.watcher is not None:
            self.watcher.request_rescan()
        log.info("reloaded")


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
