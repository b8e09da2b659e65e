"""Run a real daemon in a subprocess, for tests and benchmarks of the daemon, clients and plugins.

``DaemonProcess`` writes a config in a scratch folder (its own voices folder, cache, a free
loopback port and an ipc socket), starts ``python -m voiced serve`` and waits until it answers
a ping. Sections given as ``settings`` are merged over the defaults, key by key::

    with DaemonProcess(tmp_path, {"engine": {"refine_budget_s": 0}}) as daemon:
        shutil.copyfile("me.wav", daemon.voices / "me.wav")
        daemon.wait_ready("me")
        with daemon.client() as client:
            client.synthesize("Hello.", voice="me")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from voiced.client import Client

START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table, as ``[engine] options = { ... }``
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Tables of scalars, lists and inline tables (``{"plugins.journal": {...}}`` for a dotted table)."""
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


class DaemonProcess:
    """One ``voiced serve`` subprocess with its own folders; restartable, killable."""

    def __init__(self, root: Path, settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.root = Path(root)
        self.voices = self.root / "voices"
        self.voices.mkdir(parents=True, exist_ok=True)
        self.cache_dir = self.root / "cache"
        self.tcp = f"tcp://127.0.0.1:{free_port()}"
        self.ipc = f"ipc://{self.root}/voiced.sock"
        defaults: dict[str, dict[str, Any]] = {
            "voices": {"dir": self.voices, "settle_s": 0.3, "rename_grace_s": 0.5},
            "cache": {"dir": self.cache_dir},
            "engine": {"refine_budget_s": 2.0},
            "server": {"endpoints": [self.tcp, self.ipc], "queue_size": 8, "max_text_chars": 2000},
        }
        for name, table in (settings or {}).items():
            defaults[name] = {**defaults.get(name, {}), **table}
        self.settings = defaults
        self.config = self.root / "voiced.toml"
        self.config.write_text(render_toml(defaults))
        endpoints = [str(e) for e in defaults["server"]["endpoints"]]
        self.tcp = next((e for e in endpoints if e.startswith("tcp://")), "")
        self.ipc = next((e for e in endpoints if e.startswith("ipc://")), "")
        # ipc first: it answers a ping even when tcp requires CURVE
        self.probe = next((e for e in endpoints if e.startswith("ipc://")), endpoints[0])
        self.log = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, env: Mapping[str, str] | None = None, wait: bool = True) -> DaemonProcess:
        self._log_fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voiced", "serve", "--config", str(self.config)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        if wait:
            self.wait_answering()
        return self

    def wait_answering(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        with Client(self.probe, timeout_s=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise AssertionError(f"daemon exited with {code}:\n{self.log_tail()}")
                try:
                    client.ping()
                    return
                except Exception:
                    time.sleep(0.2)
        raise AssertionError(f"daemon did not answer within {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait (SIGKILL after timeout_s); the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self._reap()

    def kill(self) -> int:
        """SIGKILL: no chance to clean up, as in a power cut or the OOM killer."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self._reap()

    def _reap(self) -> int:
        assert self.proc is not None
        code = self.proc.returncode
        self.proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return code

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> DaemonProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ talking to it

    def client(self, endpoint: str | None = None, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout_s", START_TIMEOUT_S)
        return Client(endpoint or self.probe, **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_voice(
        self, name: str, predicate: Callable[[dict[str, Any] | None], bool], timeout_s: float = START_TIMEOUT_S
    ) -> dict[str, Any]:
        """Poll ``voices`` until ``predicate(entry or None)`` holds; the entry."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, Any] | None = None
        with self.client() as client:
            while time.monotonic() < deadline:
                seen = next((v for v in client.voices() if v["name"] == name), None)
                if predicate(seen):
                    return seen  # type: ignore[return-value]
                time.sleep(0.05)
        raise AssertionError(f"voice {name}: condition not met; last seen {seen}\n{self.log_tail()}")

    def wait_ready(self, name: str, **fields: Any) -> dict[str, Any]:
        return self.wait_voice(
            name, lambda v: v is not None and v["state"] == "ready" and all(v.get(k) == x for k, x in fields.items())
        )
