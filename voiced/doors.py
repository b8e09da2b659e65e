"""What front doors share: the plugins that open one (``openai_http``, ``wyoming``) and anyone's.

A door binds its listening socket in ``voiced_serve``, on the main thread, so a taken port or a
bad address stops the start with an error naming the setting; it serves from an asyncio event
loop on a thread of its own; and it hands requests to the daemon through ``service.submit`` with
an :class:`AsyncReply`, which carries the synthesis thread's answer over to that loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from voiced.errors import ConfigError
from voiced.protocol import VOICE_NOT_FOUND, ProtocolError

if TYPE_CHECKING:
    from voiced.hooks.specs import SynthesisService

log = logging.getLogger(__name__)


def split_listen(listen: str, key: str = "listen") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError names ``key``."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{key}: expected host:port (such as 127.0.0.1:8880), got {listen!r}")
    return host, int(port)


def bind_tcp(host: str, port: int, where: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening); ConfigError says why not."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot use {shown}: {exc}") from exc
    try:
        # a restart can take the port back at once, from connections still in TIME_WAIT;
        # a socket listening there still keeps it (Linux refuses the bind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{where}: cannot listen on {shown}: {exc.strerror or exc}") from exc
    return sock


def shown_address(sock: socket.socket) -> str:
    """``host:port`` a socket is bound to, IPv6 hosts in brackets."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def require_voice(service: SynthesisService, name: str) -> None:
    """Raise ``voice_not_found`` now for a name the daemon has never seen: a request's ``wait_s``
    is for voices being prepared, and a typo should not hold a client for that long."""
    if not any(v.get("name") == name for v in service.voices()):
        raise ProtocolError(VOICE_NOT_FOUND, f"no voice named {name!r}")


class AsyncReply:
    """A :class:`voiced.protocol.Reply` whose answer is read on an event loop: the synthesis
    thread's calls become ``("chunk", header, data)``, ``("done", header, data)`` or
    ``("fail", ProtocolError)`` items for :meth:`next`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.gone = False  # the client left: what still comes is dropped

    def _put(self, item: tuple[Any, ...]) -> None:
        if self.gone:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the door shut while this was synthesized
            pass

    def chunk(self, header: Mapping[str, Any], data: bytes) -> None:
        self._put(("chunk", header, data))

    def done(self, header: Mapping[str, Any], data: bytes) -> None:
        self._put(("done", header, data))

    def fail(self, code: str, message: str) -> None:
        self._put(("fail", ProtocolError(code, message)))

    def refused(self, error: ProtocolError) -> None:
        self._put(("fail", error))

    async def next(self) -> tuple[Any, ...]:
        return await self._queue.get()


class LoopThread:
    """An asyncio event loop running on a thread of its own, for a door's server."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
        """Run ``coroutine`` on the loop and wait for its result (from another thread)."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Cancel what still runs on the loop, then stop it and its thread."""
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if not self._thread.is_alive():
            return
        try:
            self.call(cancel_all(), timeout_s)
        except Exception as exc:  # the loop is wedged: the thread is a daemon and dies with us
            log.warning("%s: tasks did not end: %s", self._thread.name, exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
