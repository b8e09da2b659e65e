"""sd_notify: messages reach a real AF_UNIX datagram socket, in the form systemd parses."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from voiced.notify import Notifier, WatchdogPinger

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")


def parse(data: bytes) -> dict[str, str]:
    """What systemd does with a datagram: newline-separated KEY=value fields."""
    text = data.decode("utf-8")
    fields = {}
    for line in text.split("\n"):
        assert "=" in line, f"malformed field {line!r} in {text!r}"
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


class Receiver:
    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what goes into NOTIFY_SOCKET

    def recv(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        return parse(self.sock.recv(65536))

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        pytest.fail(f"unexpected message {data!r}")

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    if len(str(path)) >= 100:  # sun_path is 108 bytes
        path = Path("/tmp") / f"voiced-test-{uuid.uuid4().hex[:12]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()
        path.unlink(missing_ok=True)


@pytest.fixture
def abstract_socket() -> Iterator[Receiver]:
    if not os.uname().sysname == "Linux":
        pytest.skip("the abstract socket namespace is Linux-only")
    name = f"voiced-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    return request.getfixturevalue(f"{request.param}_socket")


def test_messages(receiver: Receiver) -> None:
    n = Notifier(receiver.env())
    assert n.enabled
    n.ready()
    assert receiver.recv() == {"READY": "1"}
    n.ready("serving 3 voices")
    assert receiver.recv() == {"READY": "1", "STATUS": "serving 3 voices"}
    n.status("loading model\nstill loading")  # a newline must not start a new field
    assert receiver.recv() == {"STATUS": "loading model still loading"}
    n.stopping()
    assert receiver.recv() == {"STOPPING": "1"}
    n.watchdog()
    assert receiver.recv() == {"WATCHDOG": "1"}
    n.extend_timeout(90)
    assert receiver.recv() == {"EXTEND_TIMEOUT_USEC": "90000000"}
    n.close()
    assert not n.enabled
    n.ready()  # after close: a no-op, no error
    assert receiver.nothing_within(0.1)


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    n = Notifier(receiver.env())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    msg = receiver.recv()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    n.close()


def test_utf8_status(path_socket: Receiver) -> None:
    n = Notifier(path_socket.env())
    n.status("voix prête: Zoë")
    assert path_socket.recv() == {"STATUS": "voix prête: Zoë"}


def test_uses_os_environ_by_default(path_socket: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.address)
    n = Notifier()
    assert n.enabled
    n.ready()
    assert path_socket.recv() == {"READY": "1"}


def test_no_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier({}), Notifier(), Notifier({"NOTIFY_SOCKET": ""})):
        assert not n.enabled
        n.ready("x")
        n.reloading()
        n.stopping()
        n.status("x")
        n.watchdog()
        assert n.send("READY=1") is False
        assert n._sock is None  # nothing was even opened
        assert n.watchdog_interval() is None
        n.close()


def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="voiced.notify"):
        n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    n.ready()
    assert "NOTIFY_SOCKET" in caplog.text


def test_send_errors_are_logged_once_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    with caplog.at_level(logging.DEBUG, logger="voiced.notify"):
        n.ready()
        n.status("x")
        n.watchdog()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "READY=1" in warnings[0].getMessage()
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "{pid}"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(path_socket: Receiver, env: dict[str, str], expected: float | None) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    n = Notifier(path_socket.env(**env))
    if expected is None:
        assert n.watchdog_interval() is None
    else:
        assert n.watchdog_interval() == pytest.approx(expected)


def test_watchdog_interval_needs_a_notify_socket() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


def test_pinger_without_watchdog_does_nothing(path_socket: Receiver) -> None:
    pinger = WatchdogPinger(Notifier(path_socket.env()), lambda: True)
    pinger.start()
    assert not pinger.running
    pinger.stop()
    assert path_socket.nothing_within(0.1)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_pinger_follows_health(path_socket: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    # WatchdogSec=200ms -> a ping every 100ms
    n = Notifier(path_socket.env(WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid())))
    healthy = threading.Event()
    healthy.set()
    checks = []

    def check() -> bool:
        checks.append(time.monotonic())
        return healthy.is_set()

    pinger = WatchdogPinger(n, check)
    assert pinger.interval == pytest.approx(0.1)
    with caplog.at_level(logging.WARNING, logger="voiced.notify"):
        pinger.start()
        try:
            # healthy: pings keep coming, about every 100ms
            times = []
            for _ in range(5):
                assert path_socket.recv(timeout=5.0) == {"WATCHDOG": "1"}
                times.append(time.monotonic())
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert sum(gaps) / len(gaps) >= 0.05  # not a busy loop
            assert min(gaps) >= 0.03
            assert max(gaps) < 3.0  # generous: slow CI machines

            # unhealthy: the next checks see it and pings stop
            healthy.clear()
            seen = len(checks)
            _wait_for(lambda: len(checks) >= seen + 2)
            # drain a ping that may have been sent just before the flag changed
            path_socket.sock.settimeout(0)
            try:
                while True:
                    path_socket.sock.recv(65536)
            except (BlockingIOError, socket.timeout):
                pass
            assert path_socket.nothing_within(0.5)  # ~5 intervals without a ping
            assert len(checks) >= seen + 3  # still checking, just not pinging
            failures = [r for r in caplog.records if "health check failed" in r.getMessage()]
            assert len(failures) == 1  # warned once, not on every check

            # healthy again: pings resume
            healthy.set()
            assert path_socket.recv(timeout=5.0) == {"WATCHDOG": "1"}
        finally:
            pinger.stop()
    assert not pinger.running
    # stopped: no more pings
    path_socket.sock.settimeout(0)
    try:
        while True:
            path_socket.sock.recv(65536)
    except (BlockingIOError, socket.timeout):
        pass
    assert path_socket.nothing_within(0.3)


def test_pinger_treats_exceptions_as_unhealthy(path_socket: Receiver) -> None:
    n = Notifier(path_socket.env(WATCHDOG_USEC="200000"))
    calls = []

    def broken() -> bool:
        calls.append(1)
        raise RuntimeError("model worker gone")

    with WatchdogPinger(n, broken) as pinger:
        assert pinger.running
        _wait_for(lambda: len(calls) >= 3)
        assert path_socket.nothing_within(0.3)
    assert not pinger.running


def test_pinger_stop_is_prompt(path_socket: Receiver) -> None:
    # a long interval must not delay stop()
    n = Notifier(path_socket.env(WATCHDOG_USEC=str(60 * 1_000_000)))
    pinger = WatchdogPinger(n, lambda: True)
    pinger.start()
    assert path_socket.recv() == {"WATCHDOG": "1"}  # first ping at once
    started = time.monotonic()
    pinger.stop()
    # well under the 30 s between pings, with room for any machine's load: stop() did not wait them out
    assert time.monotonic() - started < 20.0
    assert not pinger.running
