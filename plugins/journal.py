"""journal: append voice lifecycle events to a file as JSON lines, for other tools to tail.

One line per event, written with a single ``write()`` on a file opened with ``O_APPEND`` (so
lines from several writers never interleave, and ``tail -F`` sees whole lines)::

    {"time": "2026-05-09T07:35:12.123456+00:00", "event": "ready", "name": "alice",
     "file": "alice.wav", "sha256": "9f2c...", "state": "ready", "stage": "quick",
     "duration_s": 12.4, "reason": null}

``event`` is ``ready``, ``failed`` or ``removed``; ``reason`` is the failure's message (null
otherwise). The file is reopened when it is rotated away (renamed or deleted). With
``fsync = true`` every line is fsynced before the hook returns (durable, slower).

    [plugins.journal]
    file = "/var/log/voiced/voices.jsonl"
    fsync = false
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from voiced.hooks import PluginSettings, hookimpl


@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):
    file: Path
    """The JSON-lines file (created 0644 when missing; its folder must exist or be creatable)."""
    fsync: bool = False
    """fsync after every line."""


class Journal:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = Path(settings.file)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)

    def _rotated(self) -> bool:
        assert self._fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino)

    def write(self, event: str, voice: dict[str, Any]) -> None:
        record = {
            "time": datetime.now(timezone.utc).isoformat(),
            "event": event,
            "name": voice.get("name"),
            "file": voice.get("file"),
            "sha256": voice.get("sha256"),
            "state": voice.get("state"),
            "stage": voice.get("stage"),
            "duration_s": voice.get("duration_s"),
            "reason": voice.get("error"),
        }
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is None or self._rotated():
                self.close_locked()
                self._open()
            assert self._fd is not None
            written = os.write(self._fd, line)  # one write: O_APPEND keeps the line whole
            if written != len(line):  # pragma: no cover - a full disk
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
            if self.settings.fsync:
                os.fsync(self._fd)

    def close_locked(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @hookimpl
    def voiced_voice_ready(self, voice: dict[str, Any]) -> None:
        self.write("ready", voice)

    @hookimpl
    def voiced_voice_failed(self, voice: dict[str, Any]) -> None:
        self.write("failed", voice)

    @hookimpl
    def voiced_voice_removed(self, voice: dict[str, Any]) -> None:
        self.write("removed", voice)

    @hookimpl
    def voiced_shutdown(self) -> None:
        with self._lock:
            self.close_locked()


def plugin(settings: Settings) -> Journal:
    return Journal(settings)
