"""The ZeroMQ transport: one ROUTER socket, threads that take turns at it (leader/follower).

There are ``[server] synthesis_threads`` + 1 threads: one leads while the others synthesize (one
by default; with more, requests run side by side and a batching engine merges their sentences).

At any moment one thread is the *leader*: it waits on the ROUTER (bound to every endpoint),
parses every request, answers the cheap ops itself (ping, voices, status, embed, reload) and
admits synthesis jobs (:mod:`voiced.server.admission`: ``busy`` at once when the bounded
queue is full). When a
synthesis job arrives and the model is idle, the leader does not hand the job to another
thread: it hands the *socket* over (the other thread becomes leader) and runs the job itself,
then sends the reply itself. Jobs that arrive meanwhile queue up and that thread runs them in
turn before it goes back to waiting.

Why: on small (virtual) machines each wake-up of a sleeping thread costs 0.1-0.3 ms. A
dedicated worker fed by a queue, replying through the socket thread, puts two such wake-ups on
every request's path; here a request meets only the ones any ZeroMQ server pays. The role
change happens while the model runs, off that path.

The ROUTER is shared, so every operation on it holds ``_socket_lock`` (libzmq allows a socket
to move between threads across a full memory barrier). The leader sleeps in poll(2) on the
socket's file descriptor rather than in zmq_poll, so it holds no lock while it waits; as that
descriptor is edge-triggered, a thread that sends checks afterwards whether input is pending
and wakes the leader through a pipe.

So ``ping`` and ``status`` are answered within milliseconds while a long synthesis runs. What
a synthesis job says is :mod:`voiced.speech`'s: this module only sends the pieces.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import zmq

from voiced import __version__
from voiced.config import ServerConfig
from voiced.errors import VoicedError
from voiced.security import (
    ZAP_DOMAIN, CurveAuth, ServerKeys, check_server, is_loopback, load_server_keys, prepare_ipc, protect_ipc,
)
from voiced.protocol import (
    BAD_REQUEST,
    INTERNAL,
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    Request,
    Synthesize,
    check_synthesize,
    clip_message,
    encode,
    error_reply,
    ok_reply,
    parse_request,
    peek_id,
)
from voiced.server.admission import Admission, Job, Reply, Voices
from voiced.speech import Piece, Speech

log = logging.getLogger(__name__)

_BATCH = 64  # messages read per turn before the leader looks at anything else


class Backend(Voices, Protocol):
    """What the server needs of the daemon: the voices, and the answers to the cheap ops."""

    def status(self) -> dict[str, Any]: ...

    def embed(self, name: str) -> dict[str, Any]: ...

    def reload(self) -> None: ...


@dataclass
class ServerStats:
    served: int = 0
    failed: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def observe(self, seconds: float, ok: bool) -> None:
        if ok:
            self.served += 1
        else:
            self.failed += 1
        self.latencies.append(seconds)

    def summary(self, busy: int) -> dict[str, Any]:
        values = np.asarray(self.latencies) if self.latencies else None
        return {
            "served": self.served,
            "failed": self.failed,
            "busy": busy,
            "latency_p50_ms": None if values is None else round(float(np.percentile(values, 50)) * 1000, 3),
            "latency_p99_ms": None if values is None else round(float(np.percentile(values, 99)) * 1000, 3),
        }


class Server:
    def __init__(
        self, config: ServerConfig, backend: Backend, speech: Speech, *, context: zmq.Context | None = None,
        where: str = "config",
    ) -> None:
        self.config = config
        self.where = where  # the config file, for error messages
        self.auth: CurveAuth | None = None
        self._keys: ServerKeys | None = None
        self.backend = backend
        self.speech = speech
        self.limits = Limits(max_text_chars=config.max_text_chars, max_json_depth=config.max_json_depth)
        self.context = context or zmq.Context.instance()
        self.stats = ServerStats()
        self.admission = Admission(backend, synthesizers=config.synthesis_threads, queue_size=config.queue_size)
        self.endpoints: list[str] = []
        self._router: zmq.Socket | None = None
        self._socket_lock = threading.Lock()  # every operation on the ROUTER
        self._wake_r = self._wake_w = -1  # a pipe that wakes the leader out of poll(2)
        self._threads: list[threading.Thread] = []
        self._roles = threading.Condition(threading.Lock())  # who leads; followers wait on it
        self._leader: threading.Thread | None = None
        self._stop = threading.Event()
        self.loop_heartbeat = time.monotonic()
        self.worker_heartbeat = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        check_server(self.config, self.where)
        self._keys = load_server_keys(self.config, self.where)
        if self._keys is not None:  # the ZAP handler must run before the first CURVE handshake
            self.auth = CurveAuth(self.context, self.config.curve_clients_dir)
            self.auth.start()
        try:
            self._router = self._bind()
        except BaseException:
            if self.auth is not None:
                self.auth.stop()
                self.auth = None
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        log.info("listening on %s", ", ".join(self.endpoints))
        # the socket was made on this thread; Thread.start() is the memory barrier libzmq asks for
        self._threads = [
            # a leader and the synthesizers: they swap roles
            threading.Thread(target=self._run, name=f"voiced-server-{i}", daemon=True)
            for i in range(1 + self.config.synthesis_threads)
        ]
        for thread in self._threads:
            thread.start()

    def stop_accepting(self) -> None:
        """New synthesis requests get ``busy`` from now on; those in flight go on."""
        self.admission.stop_accepting()

    def drain(self, timeout: float) -> bool:
        """Wait until queued and running synthesis requests are answered (True) or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.admission.idle():
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._wake_leader()
        with self._roles:
            self._roles.notify_all()
        for thread in self._threads:
            thread.join(5)
        with self._socket_lock:  # a thread stuck in the model may still hold a reply
            if self._router is not None:
                self._router.close(0)
                self._router = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def reload_keys(self) -> None:
        """Re-read the allowed clients' public keys (SIGHUP)."""
        if self.auth is not None:
            self.auth.configure()

    def submit(self, request: Synthesize, reply: Reply, *, request_id: Any = None) -> None:
        """Admit a synthesis request from another front door; safe from any thread.

        It takes the same path as a ZeroMQ request: the same limits, queue, voices, hooks and
        synthesis threads. Raises :class:`ProtocolError` when it is refused at once (over a
        limit, busy, an unknown or failed voice, a voice not ready and no ``wait_s``); otherwise
        the answer goes to ``reply``, from the thread that synthesizes it."""
        try:
            request = check_synthesize(request, self.limits)
            self.admission.admit(Job(reply, request_id, request, time.monotonic()))
        except ProtocolError:
            self.stats.observe(0.0, False)
            raise
        self._wake_leader()  # it sleeps on the socket: the job may be reserved for it

    @property
    def sample_rate(self) -> int:
        return self.speech.sample_rate

    def voices(self) -> list[dict[str, Any]]:
        return self.backend.voices()

    def queue_depth(self) -> int:
        return self.admission.depth()

    def healthy(self, max_stall_s: float) -> bool:
        """The socket and the synthesis side both made progress within ``max_stall_s`` (systemd watchdog).

        The leader beats every time round its loop. The other thread beats while it waits for
        work and after every chunk it synthesizes, so a long text is progress, while a thread
        stuck inside one call is not.
        """
        now = time.monotonic()
        return (
            bool(self._threads)
            and all(t.is_alive() for t in self._threads)
            and now - self.loop_heartbeat <= max_stall_s
            and now - self.worker_heartbeat <= max_stall_s
        )

    def summary(self) -> dict[str, Any]:
        return {**self.stats.summary(self.admission.busy), "queue": self.queue_depth(),
                "endpoints": list(self.endpoints)}

    # ------------------------------------------------------------------ socket

    def _bind(self) -> zmq.Socket:
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
        return router

    # ------------------------------------------------------------------ roles

    def _run(self) -> None:
        """A server thread: follow until the leader's place is free, lead, synthesize, and again."""
        me = threading.current_thread()
        while True:
            with self._roles:
                while self._leader is not None and not self._stop.is_set():
                    self.worker_heartbeat = time.monotonic()
                    self._roles.wait(1.0)
                if self._stop.is_set():
                    return
                self._leader = me
            job = self._lead()
            if job is None:
                return
            self._work(job)

    def _lead(self) -> Job | None:
        """Serve the socket until a synthesis job is taken (returned, leadership given up) or stop."""
        router = self._router
        assert router is not None
        poller = select.poll()
        poller.register(router.getsockopt(zmq.FD), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            self.loop_heartbeat = time.monotonic()
            with self._socket_lock:
                incoming: list[list[bytes]] = []
                for _ in range(_BATCH):
                    try:
                        incoming.append(router.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            for parts in incoming:
                for reply in self._handle(parts):
                    self._send(reply)
            for job, exc in self.admission.recheck():
                self.stats.observe(time.monotonic() - job.received, False)
                job.reply.refused(exc)
            job = self.admission.take()
            if job is not None:
                with self._roles:
                    self._leader = None
                    self._roles.notify()  # the other thread takes the socket while this one runs the job
                return job
            if len(incoming) == _BATCH:
                continue
            with self._socket_lock:
                pending = router.getsockopt(zmq.EVENTS) & zmq.POLLIN
            if not pending and poller.poll(50 if self.admission.waiting else 200):
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
        return None

    def _send(self, parts: list[bytes]) -> None:
        with self._socket_lock:
            router = self._router
            if router is None:
                return
            router.send_multipart(parts)  # a ROUTER never blocks: it drops for peers that are gone
            # the send may have consumed the edge that would wake the leader for new input
            if self._leader is not threading.current_thread() and router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._wake_leader()

    def _wake_leader(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full (the leader is awake anyway) or closed at stop
            pass

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
            if isinstance(request.args, Synthesize):
                reply = _Peer(self, envelope, request.id, request.args.stream)
                self.admission.admit(Job(reply, request.id, request.args, started))
                return []
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
            assert request.args is not None
            return ok_reply(request.id, **self.backend.embed(request.args.voice))
        if op == "reload":
            self.backend.reload()
            return ok_reply(request.id, reloading=True)
        raise ProtocolError(BAD_REQUEST, f"op {op} is not handled here")  # pragma: no cover

    # ------------------------------------------------------------------ synthesis

    def _work(self, job: Job | None) -> None:
        """Run ``job``, then every job queued meanwhile; the model is this thread's until the queue is empty."""
        while job is not None:
            self.worker_heartbeat = time.monotonic()
            if not self._stop.is_set():
                try:
                    self._synthesize(job)
                except Exception:  # _synthesize answers every failure itself; this is a bug, keep serving
                    log.exception("unexpected error after synthesis for request %s", job.id)
            job = self.admission.next(drop=self._stop.is_set())

    def _synthesize(self, job: Job) -> None:
        queued_s = time.monotonic() - job.received
        utterance = self.speech.utterance(job.speech, job.voice, job.conditioning, request_id=job.id,
                                          on_chunk=self._beat)
        last = Piece(b"", 0, final=True)
        try:
            for piece in utterance.pieces():
                if piece.final:
                    last = piece
                    continue
                job.reply.chunk({"seq": piece.seq, **utterance.header}, piece.data)
        except ProtocolError as exc:
            self._fail(job, exc.code, exc.message)
            return
        total_s = time.monotonic() - job.received
        timings = {"queue_s": round(queued_s, 6), "engine_s": round(utterance.engine_s, 6),
                   "total_s": round(total_s, 6)}
        final = {**utterance.header, "duration_s": round(utterance.duration_s, 4), **timings}
        if job.speech.stream:
            final["seq"] = last.seq
        job.reply.done(final, last.data)
        self.stats.observe(total_s, True)
        utterance.finish({**timings, "duration_s": round(utterance.duration_s, 4)})  # after the reply is on its way

    def _beat(self) -> None:
        """A chunk left the engine: a long text is progress for the watchdog."""
        self.worker_heartbeat = time.monotonic()

    def _fail(self, job: Job, code: str, message: str) -> None:
        self.stats.observe(time.monotonic() - job.received, False)
        job.reply.fail(code, message)


class _Peer:
    """The reply to a ZeroMQ client: messages to its envelope through the shared ROUTER."""

    def __init__(self, server: Server, envelope: list[bytes], request_id: Any, stream: bool) -> None:
        self.server = server
        self.envelope = envelope
        self.id = request_id
        self.stream = stream

    def chunk(self, header: Mapping[str, Any], data: bytes) -> None:
        self.server._send(self.envelope + [encode({"id": self.id, "ok": True, **header, "final": False}), data])

    def done(self, header: Mapping[str, Any], data: bytes) -> None:
        final = {"id": self.id, "ok": True, **header}
        if self.stream:
            final["final"] = True
        self.server._send(self.envelope + [encode(final), data])

    def fail(self, code: str, message: str) -> None:
        reply = error_reply(self.id, code, message)
        if self.stream:  # a stream that already sent chunks ends with a final error message
            reply = encode({"id": self.id, "ok": False, "final": True,
                            "error": {"code": code, "message": clip_message(message)}})
        self.server._send(self.envelope + [reply])

    def refused(self, error: ProtocolError) -> None:
        self.server._send(self.envelope + [error_reply(self.id, error.code, error.message, **error.details)])
