"""systemd's sd_notify protocol, without libsystemd.

A message is a datagram of ``KEY=value`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET``: a filesystem path, or (leading ``@``) a name in the abstract namespace.
Outside systemd there is no ``$NOTIFY_SOCKET`` and every call is a cheap no-op.

Sending never raises: a failed send is logged (a warning the first time, debug after) and
the daemon carries on, since a service must not die because its supervisor went away.

:class:`WatchdogPinger` sends ``WATCHDOG=1`` every half ``WatchdogSec=`` for as long as a
health check passes; when the check fails (or hangs) the pings stop and systemd restarts
the service once the watchdog timeout passes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "WatchdogPinger"]


def _address(value: str) -> str | bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value, None when unusable."""
    if value.startswith("@"):
        # abstract namespace: a leading NUL byte instead of '@'
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    return None  # e.g. systemd >= 254's "vsock:CID:PORT" (VMs); not needed on a host


def _clean(value: str) -> str:
    # one field is one line: a newline in a status text would start a bogus field
    return " ".join(str(value).splitlines())


class Notifier:
    """Sends state changes to systemd. ``enabled`` is False outside a Type=notify service."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._env = env
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False
        raw = env.get("NOTIFY_SOCKET", "")
        self._addr = _address(raw) if raw else None
        if raw and self._addr is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; systemd notifications are off", raw)
        self.enabled: bool = self._addr is not None

    # -- the messages -----------------------------------------------------------------------

    def ready(self, status: str | None = None) -> None:
        """The service is up (model loaded and warmed, sockets bound), or a reload finished."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_clean(status)}")
        self.send(*fields)

    def reloading(self) -> None:
        """A reload started; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd >= 253) and ignored
        by older versions.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown began."""
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line status shown by ``systemctl status``."""
        self.send(f"STATUS={_clean(text)}")

    def watchdog(self) -> None:
        """Keep-alive ping (``WatchdogSec=``)."""
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more from now before the start/stop timeout fires (slow model loads)."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WatchdogSec=``), None when no watchdog is asked for.

        systemd sets ``WATCHDOG_USEC`` and, normally, ``WATCHDOG_PID``; a ``WATCHDOG_PID``
        that is not this process means the variables were inherited from a parent.
        """
        if not self.enabled:
            return None
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2 / 1_000_000

    # -- transport --------------------------------------------------------------------------

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one datagram; True when it was sent."""
        if self._addr is None:
            return False
        data = "\n".join(fields).encode("utf-8")
        with self._lock:
            if self._addr is None:  # closed meanwhile
                return False
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._addr)
                return True
            except OSError as exc:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "systemd notification %r failed: %s", fields[0] if fields else "", exc)
                return False

    def close(self) -> None:
        with self._lock:
            self._addr = None
            self.enabled = False
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WatchdogPinger:
    """A thread that sends ``WATCHDOG=1`` every :meth:`Notifier.watchdog_interval` while healthy.

    ``healthy()`` should be cheap and must not block for long; if it blocks (a deadlock in
    what it checks), pings stop, which is the wanted outcome: systemd then restarts the
    service. An exception from ``healthy()`` counts as unhealthy. Without a watchdog
    (``watchdog_interval()`` is None and no ``interval`` given) :meth:`start` does nothing.
    """

    def __init__(
        self,
        notifier: Notifier,
        healthy: Callable[[], bool],
        *,
        interval: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.healthy = healthy
        self.interval = interval if interval is not None else notifier.watchdog_interval()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.interval is None or self.interval <= 0 or not self.notifier.enabled or self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="voiced-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _check(self) -> bool:
        try:
            return bool(self.healthy())
        except Exception as exc:  # noqa: BLE001 - any failure of the check is "unhealthy"
            if not self._failing:
                log.warning("health check raised: %r", exc)
            return False

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.is_set():
            ok = self._check()
            if self._stop.is_set():
                break
            if ok:
                if self._failing:
                    log.warning("health check passes again; watchdog pings resumed")
                    self._failing = False
                self.notifier.watchdog()
            elif not self._failing:
                self._failing = True
                log.warning(
                    "health check failed; watchdog pings withheld (systemd restarts the service "
                    "if this lasts past WatchdogSec)"
                )
            self._stop.wait(self.interval)

    def __enter__(self) -> "WatchdogPinger":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
