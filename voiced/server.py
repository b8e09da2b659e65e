"""The ZeroMQ server: a ROUTER socket loop that never waits on the model, and a synthesis worker.

Threads and sockets (a zmq socket belongs to one thread):

* the socket loop owns the ROUTER (bound to every endpoint) and an inproc PULL; it parses
  every request, answers the cheap ops itself (ping, voices, status, embed, reload) and puts
  synthesis jobs on a bounded queue, answering ``busy`` at once when it is full;
* the synthesis worker owns the model's compute; it sends its replies (and stream chunks)
  through an inproc PUSH to the loop, which forwards them on the ROUTER.

So ``ping`` and ``status`` are answered within milliseconds while a long synthesis runs.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol

import numpy as np
import zmq

from voiced import __version__
from voiced.audio_out import AudioWriter
from voiced.config import ServerConfig
from voiced.errors import VoicedError
from voiced.plugins import PluginError, PluginHost, new_request
from voiced.security import (
    ZAP_DOMAIN, CurveAuth, ServerKeys, check_server, is_loopback, load_server_keys, prepare_ipc, protect_ipc,
)
from voiced.protocol import (
    BAD_REQUEST,
    BUSY,
    INTERNAL,
    PROTOCOL_VERSION,
    VOICE_NOT_FOUND,
    VOICE_NOT_READY,
    Limits,
    ProtocolError,
    Request,
    encode,
    error_reply,
    ok_reply,
    parse_request,
    peek_id,
)

log = logging.getLogger(__name__)

_REPLIES = "inproc://voiced-replies"
_WAKE = b"\x00wake"


class Backend(Protocol):
    """What the server needs of the daemon."""

    def voices(self) -> list[dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def embed(self, name: str) -> dict[str, Any]: ...

    def reload(self) -> None: ...

    def voice_for_synthesis(self, name: str) -> tuple[dict[str, Any], Any] | None:
        """(voice dict, conditioning) of a voice that can be spoken now; None if not (yet) ready.

        Raises ProtocolError for an unknown or failed voice."""
        ...

    def synthesize(self, text: str, conditioning: Any, params: Mapping[str, Any]) -> Iterator[np.ndarray]: ...

    @property
    def sample_rate(self) -> int: ...


@dataclass
class Job:
    envelope: list[bytes]
    request: Request
    received: float
    deadline: float = math.inf
    voice: dict[str, Any] = field(default_factory=dict)
    conditioning: Any = None


@dataclass
class ServerStats:
    served: int = 0
    failed: int = 0
    busy: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def observe(self, seconds: float, ok: bool) -> None:
        if ok:
            self.served += 1
        else:
            self.failed += 1
        self.latencies.append(seconds)

    def summary(self) -> dict[str, Any]:
        values = np.asarray(self.latencies) if self.latencies else None
        return {
            "served": self.served,
            "failed": self.failed,
            "busy": self.busy,
            "latency_p50_ms": None if values is None else round(float(np.percentile(values, 50)) * 1000, 3),
            "latency_p99_ms": None if values is None else round(float(np.percentile(values, 99)) * 1000, 3),
        }


class Server:
    def __init__(
        self, config: ServerConfig, backend: Backend, *, context: zmq.Context | None = None,
        plugins: PluginHost | None = None, where: str = "config",
    ) -> None:
        self.config = config
        self.where = where  # the config file, for error messages
        self.auth: CurveAuth | None = None
        self._keys: ServerKeys | None = None
        self.backend = backend
        self.plugins = plugins
        self.limits = Limits(max_text_chars=config.max_text_chars, max_json_depth=config.max_json_depth)
        self.context = context or zmq.Context.instance()
        self.stats = ServerStats()
        self.endpoints: list[str] = []
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=config.queue_size)
        self._waiting: list[Job] = []
        self._accepting = True
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._worker_thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._in_flight = 0
        self._lock = threading.Lock()
        self.loop_heartbeat = time.monotonic()
        self.worker_heartbeat = time.monotonic()
        self.worker_hang = threading.Event()  # a test hook: makes the worker stop answering

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        check_server(self.config, self.where)
        self._keys = load_server_keys(self.config, self.where)
        if self._keys is not None:  # the ZAP handler must run before the first CURVE handshake
            self.auth = CurveAuth(self.context, self.config.curve_clients_dir)
            self.auth.start()
        self._loop_thread = threading.Thread(target=self._run_loop, name="voiced-socket", daemon=True)
        self._loop_thread.start()
        self._bound.wait(30)
        if self._bind_error is not None:
            if self.auth is not None:
                self.auth.stop()
                self.auth = None
            raise self._bind_error
        self._worker_thread = threading.Thread(target=self._run_worker, name="voiced-synth", daemon=True)
        self._worker_thread.start()

    def stop_accepting(self) -> None:
        """New synthesis requests get ``busy`` from now on; those in flight go on."""
        self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Wait until queued and running synthesis requests are answered (True) or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = self._in_flight == 0 and not self._waiting
            if idle and self._jobs.empty():
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        for thread in (self._worker_thread, self._loop_thread):
            if thread is not None:
                thread.join(5)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def reload_keys(self) -> None:
        """Re-read the allowed clients' public keys (SIGHUP)."""
        if self.auth is not None:
            self.auth.configure()

    def queue_depth(self) -> int:
        with self._lock:
            return self._jobs.qsize() + self._in_flight

    def healthy(self, max_stall_s: float) -> bool:
        """Both the socket loop and the worker made progress within ``max_stall_s`` (systemd watchdog).

        The worker beats while it waits for work and after every chunk it synthesizes, so a long
        text is progress, while a worker stuck inside one call is not.
        """
        now = time.monotonic()
        threads = [t for t in (self._loop_thread, self._worker_thread) if t is not None]
        return (
            all(t.is_alive() for t in threads)
            and now - self.loop_heartbeat <= max_stall_s
            and now - self.worker_heartbeat <= max_stall_s
        )

    def summary(self) -> dict[str, Any]:
        return {**self.stats.summary(), "queue": self.queue_depth(), "endpoints": list(self.endpoints)}

    # ------------------------------------------------------------------ socket loop

    def _bind(self) -> tuple[zmq.Socket, zmq.Socket]:
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # libzmq copies the socket's options into each listener when it binds: the local
        # endpoints are bound first without CURVE, then CURVE is switched on for every tcp://
        # endpoint (tests/test_security.py checks both sides).
        bound: dict[int, str] = {}
        order = sorted(range(len(self.config.endpoints)), key=lambda i: self.config.endpoints[i].startswith("tcp://"))
        keys = self._keys
        try:
            for i in order:
                endpoint = self.config.endpoints[i]
                tcp = endpoint.startswith("tcp://")
                if tcp and keys is not None and not router.getsockopt(zmq.CURVE_SERVER):
                    router.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
                    router.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
                    router.setsockopt(zmq.CURVE_SERVER, 1)
                    router.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
                elif tcp and keys is None and not is_loopback(endpoint):
                    log.warning("%s is reachable from the network WITHOUT authentication (allow_insecure = true)",
                                endpoint)
                ipc_path = prepare_ipc(endpoint) if endpoint.startswith("ipc://") else None
                try:
                    router.bind(endpoint)
                except zmq.ZMQError as exc:
                    raise VoicedError(f"cannot bind {endpoint}: {exc}") from None
                if ipc_path is not None:
                    protect_ipc(ipc_path, self.config.ipc_group)
                bound[i] = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            router.close(0)
            raise
        self.endpoints.extend(bound[i] for i in sorted(bound))
        if keys is not None:
            log.info("CURVE authentication on %s", ", ".join(e for e in self.endpoints if e.startswith("tcp://")))
        pull = self.context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(_REPLIES + f"-{id(self)}")
        return router, pull

    def _run_loop(self) -> None:
        try:
            router, pull = self._bind()
        except BaseException as exc:  # reported to start()
            self._bind_error = exc
            self._bound.set()
            return
        self._bound.set()
        log.info("listening on %s", ", ".join(self.endpoints))
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self.loop_heartbeat = time.monotonic()
                events = dict(poller.poll(50 if self._waiting else 200))
                if pull in events:
                    for _ in range(64):  # forward replies first: they finish work already done
                        try:
                            parts = pull.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        if parts != [_WAKE]:
                            router.send_multipart(parts)
                if router in events:
                    for _ in range(64):
                        try:
                            parts = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        for reply in self._handle(parts):
                            router.send_multipart(reply)
                for reply in self._check_waiting():
                    router.send_multipart(reply)
        finally:
            router.close(0)
            pull.close(0)

    def _handle(self, parts: list[bytes]) -> list[list[bytes]]:
        """Answer one incoming message; returns the messages to send now."""
        started = time.monotonic()
        identity, rest = parts[0], parts[1:]
        envelope = [identity]
        if rest and rest[0] == b"":  # REQ clients put an empty delimiter before the body
            envelope.append(b"")
            rest = rest[1:]
        if len(rest) != 1:
            self.stats.observe(0.0, False)
            request_id = peek_id(rest[0]) if rest else None
            message = "empty message" if not rest else f"a request is one frame, got {len(rest)}"
            return [envelope + [error_reply(request_id, BAD_REQUEST, message)]]
        frame = rest[0]
        try:
            request = parse_request(frame, self.limits)
        except ProtocolError as exc:
            self.stats.observe(time.monotonic() - started, False)
            return [envelope + [error_reply(peek_id(frame), exc.code, exc.message, **exc.details)]]
        try:
            if request.op == "synthesize":
                return self._accept_synthesis(Job(envelope, request, started))
            reply = self._answer(request)
        except ProtocolError as exc:
            self.stats.observe(time.monotonic() - started, False)
            return [envelope + [error_reply(request.id, exc.code, exc.message, **exc.details)]]
        except Exception:
            log.exception("internal error answering %s", request.op)
            self.stats.observe(time.monotonic() - started, False)
            return [envelope + [error_reply(request.id, INTERNAL, f"internal error in {request.op} (see the daemon log)")]]
        self.stats.observe(time.monotonic() - started, True)
        return [envelope + [reply]]

    def _answer(self, request: Request) -> bytes:
        op = request.op
        if op == "ping":
            return ok_reply(request.id, version=__version__, protocol=PROTOCOL_VERSION)
        if op == "voices":
            return ok_reply(request.id, voices=self.backend.voices())
        if op == "status":
            return ok_reply(request.id, **self.backend.status())
        if op == "embed":
            return ok_reply(request.id, **self.backend.embed(request.fields["voice"]))
        if op == "reload":
            self.backend.reload()
            return ok_reply(request.id, reloading=True)
        raise ProtocolError(BAD_REQUEST, f"op {op} is not handled here")  # pragma: no cover

    # ------------------------------------------------------------------ synthesis admission

    def _accept_synthesis(self, job: Job) -> list[list[bytes]]:
        if not self._accepting:
            self.stats.busy += 1
            raise ProtocolError(BUSY, "the daemon is shutting down")
        found = self._find_voice(job, time.monotonic())
        if found is None:
            wait_s = float(job.request.fields.get("wait_s") or 0)
            if wait_s <= 0:
                raise self._not_ready(job.request.fields["voice"])
            job.deadline = time.monotonic() + wait_s
            with self._lock:
                self._waiting.append(job)
            return []
        job.voice, job.conditioning = found
        return self._enqueue(job)

    def _find_voice(self, job: Job, now: float) -> tuple[dict[str, Any], Any] | None:
        """The voice if it can be spoken; None to keep waiting (a file just dropped may not be known yet)."""
        try:
            return self.backend.voice_for_synthesis(job.request.fields["voice"])
        except ProtocolError as exc:
            if exc.code == VOICE_NOT_FOUND and job.request.fields.get("wait_s") and now < job.deadline:
                return None
            raise

    def _not_ready(self, name: str) -> ProtocolError:
        voice = next((v for v in self.backend.voices() if v["name"] == name), None)
        state = voice["state"] if voice else "pending"
        return ProtocolError(VOICE_NOT_READY, f"voice {name!r} is {state}; ask again later or pass wait_s", state=state)

    def _enqueue(self, job: Job) -> list[list[bytes]]:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.stats.busy += 1
            raise ProtocolError(BUSY, f"{self.config.queue_size} synthesis requests are already waiting") from None
        return []

    def _check_waiting(self) -> list[list[bytes]]:
        if not self._waiting:
            return []
        out: list[list[bytes]] = []
        now = time.monotonic()
        with self._lock:
            waiting, self._waiting = self._waiting, []
        still: list[Job] = []
        for job in waiting:
            try:
                found = self._find_voice(job, now)
                if found is not None:
                    job.voice, job.conditioning = found
                    self._enqueue(job)
                elif now >= job.deadline:
                    raise self._not_ready(job.request.fields["voice"])
                else:
                    still.append(job)
            except ProtocolError as exc:
                self.stats.observe(now - job.received, False)
                out.append(job.envelope + [error_reply(job.request.id, exc.code, exc.message, **exc.details)])
        with self._lock:
            self._waiting.extend(still)
        return out

    # ------------------------------------------------------------------ synthesis worker

    def _run_worker(self) -> None:
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(_REPLIES + f"-{id(self)}")
        try:
            while True:
                if self.worker_hang.is_set() and not self._stop.is_set():
                    time.sleep(0.05)  # test hook: a hung model worker (no heartbeat, no work)
                    continue
                self.worker_heartbeat = time.monotonic()
                try:
                    job = self._jobs.get(timeout=1.0)
                except queue.Empty:
                    continue
                if job is None:
                    return
                with self._lock:
                    self._in_flight += 1
                try:
                    self._synthesize(job, push)
                finally:
                    with self._lock:
                        self._in_flight -= 1
                    push.send(_WAKE)
        finally:
            push.close()

    def _synthesize(self, job: Job, push: zmq.Socket) -> None:
        request = job.request
        fields = request.fields
        fmt = fields.get("format", "wav")
        stream = bool(fields.get("stream"))
        queued_s = time.monotonic() - job.received
        voice = job.voice
        header: dict[str, Any] = {
            "sample_rate": fields.get("sample_rate") or self.backend.sample_rate,
            "channels": 1,
            "format": fmt,
            "voice": {"name": voice.get("name"), "sha256": voice.get("sha256")},
        }
        if voice.get("stage"):
            header["voice"]["stage"] = voice["stage"]
        engine_s = 0.0
        plugins = self.plugins
        rate = self.backend.sample_rate
        info: dict[str, Any] = {}
        post = keep = False
        kept: list[np.ndarray] = []  # the reply's audio, for post-processing whole replies and synthesis_done
        try:
            writer = AudioWriter(fmt, rate, fields.get("sample_rate"))
            params = fields.get("params") or {}
            text = fields["text"]
            if plugins is not None:
                info = new_request(text=text, voice=voice, params=params, fmt=fmt, stream=stream, request_id=request.id)
                text = plugins.preprocess_text(text, str(voice.get("name")), params)
                info["spoken_text"] = text
                post = plugins.has_hook("voiced_postprocess_audio")
                keep = plugins.has_hook("voiced_synthesis_done")
            started = time.monotonic()
            chunks = self.backend.synthesize(text, job.conditioning, params)  # text front end runs here
            engine_s += time.monotonic() - started
            seq = 0
            body: list[bytes] = []
            while True:
                started = time.monotonic()
                try:
                    chunk = next(chunks)
                except StopIteration:
                    engine_s += time.monotonic() - started
                    break
                engine_s += time.monotonic() - started
                self.worker_heartbeat = time.monotonic()
                if stream:
                    if post:
                        chunk = plugins.postprocess_audio(chunk, rate, {**info, "seq": seq, "final": False})
                    if keep:
                        kept.append(chunk)
                    data = writer.feed(chunk)
                    part = {"id": request.id, "ok": True, "seq": seq, "final": False, **header}
                    push.send_multipart(job.envelope + [encode(part), data])
                    seq += 1
                elif post or keep:
                    kept.append(chunk)  # whole replies are post-processed as one signal
                else:
                    body.append(writer.feed(chunk))
            if stream and post:  # the end of a stream: plugins may add a tail (e.g. padding)
                end = plugins.postprocess_audio(np.zeros(0, np.float32), rate, {**info, "seq": seq, "final": True})
                if keep:
                    kept.append(end)
                body.append(writer.feed(end))
            elif not stream and (post or keep):
                whole = np.concatenate(kept) if kept else np.zeros(0, np.float32)
                if post:
                    whole = plugins.postprocess_audio(whole, rate, {**info, "seq": 0, "final": True})
                kept = [whole]
                body.append(writer.feed(whole))
            tail = writer.finish()
        except PluginError as exc:  # before VoicedError: a plugin's failure is ours, not the client's
            self._fail(job, push, INTERNAL, str(exc))
            return
        except ProtocolError as exc:
            self._fail(job, push, exc.code, exc.message)
            return
        except (VoicedError, ValueError) as exc:
            self._fail(job, push, BAD_REQUEST, str(exc))
            return
        except Exception as exc:
            log.exception("synthesis failed for voice %s", voice.get("name"))
            self._fail(job, push, INTERNAL, f"synthesis failed: {type(exc).__name__}: {exc}")
            return
        total_s = time.monotonic() - job.received
        final = {
            "id": request.id,
            "ok": True,
            **header,
            "duration_s": round(writer.duration_s, 4),
            "engine_s": round(engine_s, 6),
            "queue_s": round(queued_s, 6),
            "total_s": round(total_s, 6),
        }
        if stream:
            final.update(seq=seq, final=True)
        push.send_multipart(job.envelope + [encode(final), b"".join(body) + tail])
        self.stats.observe(total_s, True)
        if keep and plugins is not None:  # after the reply is on its way; never raises
            audio = np.concatenate(kept) if kept else np.zeros(0, np.float32)
            timings = {"queue_s": round(queued_s, 6), "engine_s": round(engine_s, 6), "total_s": round(total_s, 6),
                       "duration_s": round(writer.duration_s, 4)}
            plugins.synthesis_done({**info, "seq": seq, "final": True}, audio, rate, timings)

    def _fail(self, job: Job, push: zmq.Socket, code: str, message: str) -> None:
        self.stats.observe(time.monotonic() - job.received, False)
        reply = error_reply(job.request.id, code, message)
        if job.request.fields.get("stream"):
            # a stream that already sent chunks ends with a final error message
            reply = encode({"id": job.request.id, "ok": False, "final": True,
                            "error": {"code": code, "message": message}})
        push.send_multipart(job.envelope + [reply])
