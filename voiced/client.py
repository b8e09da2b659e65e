"""A small synchronous client for the voiced daemon (protocol v1 over ZeroMQ).

    from voiced.client import Client

    with Client("tcp://127.0.0.1:5599") as client:
        print(client.ping())
        result = client.synthesize("Hello there.", voice="alice", format="wav")
        open("hello.wav", "wb").write(result.audio)
        for chunk in client.stream("A long text. In sentences.", voice="alice"):
            player.write(chunk.audio)          # pcm_s16le at chunk.header["sample_rate"]

Every call raises :class:`RequestError` (with the protocol's error ``code``) when the daemon
answers ``ok: false``, :class:`Unreachable` as soon as ZeroMQ reports that no daemon can answer
(nothing listens, the key is refused, the connection closed), and :class:`ClientTimeout` when it
does not answer in time. One client
object is meant for one thread; make one per thread.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import zmq

from voiced.errors import VoicedError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5599"
# The daemon's default [server] max_message_bytes. A larger message is dropped by its socket
# without an answer, so a timeout on one says so.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


class RequestError(VoicedError):
    """The daemon answered with an error."""

    def __init__(self, code: str, message: str, header: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.header = header or {}


class ClientTimeout(VoicedError):
    """No answer within the client's timeout (is the daemon running at that endpoint?)."""


class Unreachable(ClientTimeout):
    """No daemon can answer: nothing listens at the endpoint, what listens refused this client (its
    CURVE key) or does not speak the protocol, or the connection closed before the answer came.

    Raised as soon as ZeroMQ reports it, not at the timeout. A kind of :class:`ClientTimeout`, so
    code that waits for a daemon to come up and retries keeps working.
    """


@dataclass(frozen=True)
class Reply:
    header: dict[str, Any]
    frames: list[bytes]

    @property
    def audio(self) -> bytes:
        return b"".join(self.frames)


class Client:
    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 60.0,
        context: zmq.Context | None = None,
        curve_server_key: str | os.PathLike[str] | None = None,
        curve_key: str | os.PathLike[str] | None = None,
    ) -> None:
        """``curve_server_key`` (the server's public ``.key`` file) and ``curve_key`` (this
        client's ``.key_secret`` file) turn on CURVE, for a daemon with ``curve_secret_key`` set;
        both default to $VOICED_SERVER_KEY and $VOICED_CLIENT_KEY. An unknown key gets no answer
        (:class:`ClientTimeout`): the daemon drops it in the handshake."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        curve_server_key = curve_server_key or os.environ.get("VOICED_SERVER_KEY") or None
        curve_key = curve_key or os.environ.get("VOICED_CLIENT_KEY") or None
        if bool(curve_server_key) != bool(curve_key):
            raise VoicedError("CURVE needs both the server's public key (--server-key) and a client key (--key)")
        keys = None
        if curve_server_key and curve_key:
            from voiced.security import client_keys

            keys = client_keys(curve_server_key, curve_key)
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            server_public, public, secret = keys
            self._socket.setsockopt(zmq.CURVE_SERVERKEY, server_public)
            self._socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self._link = _Link(self._socket, endpoint, curve=keys is not None)
        self._socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{id(self):x}-"
        # replies that arrived for other requests still awaited on this socket
        self._pending: set[str] = set()
        self._oversized: dict[str, int] = {}  # request id -> bytes, over DEFAULT_MAX_MESSAGE_BYTES
        self._early: dict[str, list[Reply | RequestError]] = {}

    def close(self) -> None:
        self._link.close()
        self._socket.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ raw protocol

    def send(self, op: str, **fields: Any) -> str:
        """Send one request; returns its id."""
        request_id = f"{self._prefix}{next(self._ids)}"
        body = {"op": op, "id": request_id, **{k: v for k, v in fields.items() if v is not None}}
        data = json.dumps(body).encode("utf-8")
        self._link.fresh()
        self._send(data)
        self._pending.add(request_id)
        if len(data) > DEFAULT_MAX_MESSAGE_BYTES:
            self._oversized[request_id] = len(data)
        return request_id

    def _send(self, data: bytes) -> None:
        """Queue ``data`` without blocking for ever: after a failed handshake ZeroMQ drops the
        connection's queue and never retries, and a plain send would then wait for good."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self._socket.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or not self._link.wait(int(left * 1000) + 1, zmq.POLLOUT):
                problem = self._link.problem()
                if problem is not None:
                    raise Unreachable(problem) from None
                raise ClientTimeout(f"could not send to {self.endpoint} within {self.timeout_s:g}s") from None

    def receive(self, request_id: str, timeout_s: float | None = None) -> Reply:
        """The next message answering ``request_id``.

        Replies to other requests in flight on this client are kept for their own ``receive``;
        replies to requests nobody awaits any more (timed out) are dropped.
        """
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            early = self._early.get(request_id)
            if early:
                return self._deliver(request_id, early.pop(0))
            left = deadline - time.monotonic()
            if left <= 0 or not self._link.wait(int(left * 1000) + 1):
                problem = self._link.problem()
                self._pending.discard(request_id)
                self._early.pop(request_id, None)
                size = self._oversized.pop(request_id, None)
                hint = "" if size is None else (
                    f"; the request was {size / 2**20:.1f} MiB, and a daemon drops a message over its "
                    f"[server] max_message_bytes ({DEFAULT_MAX_MESSAGE_BYTES >> 20} MiB unless set) without answering")
                if problem is not None:
                    raise Unreachable(problem + hint)
                raise ClientTimeout(f"no answer from {self.endpoint} within {self.timeout_s:g}s{hint}")
            parts = self._socket.recv_multipart()
            if parts and parts[0] == b"":
                parts = parts[1:]
            try:
                header = json.loads(parts[0])
            except (ValueError, IndexError):
                continue
            reply_id = header.get("id")
            if not header.get("ok"):
                error = header.get("error") or {}
                outcome: Reply | RequestError = RequestError(
                    error.get("code", "internal"), error.get("message", "unknown error"), header
                )
            else:
                outcome = Reply(header, parts[1:])
            if reply_id == request_id:
                return self._deliver(request_id, outcome)
            if reply_id in self._pending:
                self._early.setdefault(reply_id, []).append(outcome)

    def _deliver(self, request_id: str, outcome: Reply | RequestError) -> Reply:
        header = outcome.header
        if header.get("final", True) or not header.get("ok", True):
            # the last message for this id (a plain reply, a stream's final one, or an error)
            self._pending.discard(request_id)
            self._oversized.pop(request_id, None)
            if not self._early.get(request_id):
                self._early.pop(request_id, None)
        if isinstance(outcome, RequestError):
            raise outcome
        return outcome

    def request(self, op: str, **fields: Any) -> Reply:
        return self.receive(self.send(op, **fields))

    # ------------------------------------------------------------------ ops

    def ping(self) -> dict[str, Any]:
        return self.request("ping").header

    def voices(self) -> list[dict[str, Any]]:
        return list(self.request("voices").header["voices"])

    def status(self) -> dict[str, Any]:
        return self.request("status").header

    def embed(self, voice: str) -> dict[str, Any]:
        return self.request("embed", voice=voice).header

    def reload(self) -> dict[str, Any]:
        return self.request("reload").header

    def synthesize(
        self,
        text: str,
        voice: str,
        *,
        format: str = "wav",
        params: dict[str, Any] | None = None,
        sample_rate: int | None = None,
        wait_s: float | None = None,
    ) -> Reply:
        """The whole audio in one reply; ``reply.header`` has sample_rate, duration_s, voice..."""
        timeout = self.timeout_s + (wait_s or 0)
        request_id = self.send(
            "synthesize", text=text, voice=voice, format=format, params=params, sample_rate=sample_rate, wait_s=wait_s
        )
        return self.receive(request_id, timeout)

    def stream(
        self,
        text: str,
        voice: str,
        *,
        format: str = "pcm_s16le",
        params: dict[str, Any] | None = None,
        sample_rate: int | None = None,
        wait_s: float | None = None,
    ) -> Iterator[Reply]:
        """Chunks as the daemon produces them (one per sentence); the last has ``final: true``."""
        request_id = self.send(
            "synthesize", text=text, voice=voice, format=format, params=params, sample_rate=sample_rate,
            wait_s=wait_s, stream=True,
        )
        timeout = self.timeout_s + (wait_s or 0)
        while True:
            reply = self.receive(request_id, timeout)
            yield reply
            if reply.header.get("final"):
                return
            timeout = self.timeout_s


class _Link:
    """What ZeroMQ's socket monitor says about the connection to the daemon.

    ZeroMQ reconnects silently, so without this a client of a daemon that is not running (or of
    one that refuses its key) waits its whole timeout. A refused connection before any handshake
    succeeded means nothing listens there; a failed handshake, a refused key or a wrong protocol;
    a connection lost after the handshake while an answer is awaited, a daemon that went away.
    """

    _EVENTS = (zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self, socket: zmq.Socket, endpoint: str, *, curve: bool) -> None:
        self.endpoint, self.curve = endpoint, curve
        self._monitor = socket.get_monitor_socket(self._EVENTS)
        self._socket = socket
        self._pollers: dict[int, zmq.Poller] = {}
        self.up = False  # a handshake succeeded: a daemon is there
        self._problem: str | None = None
        self._handshake_failed: str | None = None

    def wait(self, timeout_ms: int, flag: int = zmq.POLLIN) -> bool:
        """True once a reply can be read (``flag`` POLLIN) or a request queued (POLLOUT); False at
        the timeout or once a problem is known."""
        deadline = time.monotonic() + timeout_ms / 1000
        poller = self._pollers.get(flag)
        if poller is None:
            poller = self._pollers[flag] = zmq.Poller()
            poller.register(self._socket, flag)
            poller.register(self._monitor, zmq.POLLIN)
        while self._problem is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            events = dict(poller.poll(int(left * 1000) + 1))
            if self._monitor in events:
                self._read_events()
            if self._socket in events:
                return True
        return bool(self._socket.poll(0, flag))  # a reply that came before the trouble is still read

    def fresh(self) -> None:
        """A request is sent: a connection lost or refused before it is not its problem (a daemon
        still missing is reported again at ZeroMQ's next retry), but a failed handshake is: ZeroMQ
        does not retry after a refused key or a protocol mismatch."""
        self.problem()
        self._problem = self._handshake_failed

    def problem(self) -> str | None:
        self._read_events()
        return self._problem

    def _read_events(self) -> None:
        """Take in every event queued so far; the first problem among them is the one reported."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            found: str | None = None
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
            elif event == zmq.EVENT_DISCONNECTED:
                if self.up:
                    found = f"the daemon at {self.endpoint} closed the connection before answering"
                self.up = False
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                found = (f"the daemon at {self.endpoint} refused this client's key: add its public key to the "
                         "daemon's [server] curve_clients_dir, or use a key that is there")
                self._handshake_failed = self._handshake_failed or found
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                found = (f"the CURVE handshake with {self.endpoint} failed: is --server-key the daemon's public "
                         "key, and does the daemon use CURVE?" if self.curve else
                         f"what listens at {self.endpoint} does not speak the voiced protocol without CURVE "
                         "(a daemon with curve_secret_key set needs --server-key and --key)")
                self._handshake_failed = self._handshake_failed or found
            elif event == zmq.EVENT_CONNECT_RETRIED and not self.up:
                found = f"no daemon listens at {self.endpoint}{self._why_not()}; start one with 'voiced serve'"
            if self._problem is None:
                self._problem = found

    def _why_not(self) -> str:
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[len("ipc://"):]):
            return " (no such socket file)"
        return " (connection refused)"

    def close(self) -> None:
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
