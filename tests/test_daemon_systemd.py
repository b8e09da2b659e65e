"""The real daemon under a fake service manager: NOTIFY_SOCKET is a datagram socket this test owns."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq

from voiced.client import Client
from voiced.testing import DaemonProcess

TIMEOUT = 120.0


class Manager:
    """Receives sd_notify datagrams and keeps them with their arrival times."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str = "1", after: float = 0.0, timeout: float = TIMEOUT) -> float:
        def found() -> float | None:
            return next((t for t, m in self.messages if t >= after and m.get(key) == value), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {key}={value} after {after}: {self.messages}")
            result = found()
        assert result is not None
        return result

    def times(self, key: str, start: float, end: float) -> list[float]:
        with self._cond:
            return [t for t, m in self.messages if start <= t <= end and key in m]

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


# An injected fault: a plugin whose text hook never returns for text that starts with "HANG",
# as a model call stuck in a driver would. The daemon carries no test hook of its own.
HANG_PLUGIN = """
import threading
from voiced.hooks import hookimpl

NEVER = threading.Event()

@hookimpl
def voiced_preprocess_text(text):
    if text.startswith("HANG"):
        NEVER.wait()
"""


@pytest.mark.slow
def test_notify_ready_watchdog_reload_stop(tmp_path: Path, testdata_dir: Path) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "hang.py").write_text(HANG_PLUGIN)
    daemon = DaemonProcess(tmp_path, {"engine": {"refine_budget_s": 0.0}, "plugins": {"paths": [str(faults)]},
                                      "server": {"stop_timeout_s": 2.0}})
    (daemon.voices / "allison.wav").write_bytes((testdata_dir / "voices" / "allison_a.wav").read_bytes())
    endpoint = daemon.tcp
    manager = Manager(tmp_path / "notify.sock")
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "1000000",  # pings every 0.5 s
        "WATCHDOG_PID": "",  # not inherited from a manager running the tests
    }
    started = time.monotonic()
    daemon.start(env, wait=False)
    proc = daemon.proc
    assert proc is not None
    try:
        ready = manager.wait_for("READY")
        # READY=1 only once the model is loaded and warm and the socket is bound
        text = (tmp_path / "daemon.log").read_text()
        assert "loaded and warm" in text
        assert any("STATUS" in m and "loading" in m["STATUS"] for t, m in manager.messages if t < ready)
        with Client(endpoint, timeout_s=5) as client:
            assert client.ping()["protocol"] == 1

        # watchdog pings at about the interval
        first = manager.wait_for("WATCHDOG", after=ready)
        time.sleep(2.6)
        pings = manager.times("WATCHDOG", first, first + 2.5)
        assert 3 <= len(pings) <= 8, pings
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 1.0, gaps

        # SIGHUP: RELOADING=1, then READY=1 again
        hup = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        reloading = manager.wait_for("RELOADING", after=hup)
        manager.wait_for("READY", after=reloading)
        assert any("MONOTONIC_USEC" in m for t, m in manager.messages if t >= hup)

        # a synthesis stuck inside a call stops the pings (the stall limit here is 5 s)
        daemon.wait_ready("allison")
        stuck = zmq.Context.instance().socket(zmq.DEALER)
        stuck.setsockopt(zmq.LINGER, 0)
        stuck.connect(endpoint)
        hang = time.monotonic()
        stuck.send(json.dumps({"op": "synthesize", "id": 1, "text": "HANG here.", "voice": "allison"}).encode())
        time.sleep(7.0)
        quiet_from = time.monotonic()
        time.sleep(2.0)
        assert manager.times("WATCHDOG", quiet_from, time.monotonic()) == [], "pings must stop while the worker hangs"
        assert manager.times("WATCHDOG", hang, hang + 3.0), "pings went on until the stall limit"
        assert not stuck.poll(0), "the request is still stuck in its hook"
        with Client(endpoint, timeout_s=5) as client:
            assert client.ping()["protocol"] == 1  # the socket itself is still served

        # SIGTERM: STOPPING=1 and exit status 0 within the stop timeout
        term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING", after=term)
        assert proc.wait(60) == 0
        stuck.close()
    finally:
        daemon.kill()
        manager.close()
    assert time.monotonic() - started < 300
