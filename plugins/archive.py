"""archive: keep every synthesized reply as a WAV file plus its request metadata as JSON.

For each reply sent, two files appear in ``dir``, named after the time, the voice and the
request (``20260509T073512.123456Z-alice-1f2e3d4c.wav`` and ``.json``). The JSON has the text
(as received and as spoken after pre-processing), the voice (name, sha256, stage), params,
format, stream flag, sample rate, duration and timings (queue, engine, total). The audio is
the engine-rate, post-processed signal (mono 16-bit PCM), whatever format the client got.

Each file is written atomically (temporary file, fsync, rename, fsync of the folder), WAV
first, so a ``.json`` always has its ``.wav`` complete beside it; leftover temporary files of
a crash are removed at start. When the folder's archived files exceed ``max_mb``, the oldest
replies are deleted first (the newest one is always kept); ``max_mb = 0`` keeps everything.

Runs in ``voiced_synthesis_done`` on the synthesis worker after the reply is sent (a few ms,
plus the disk's fsync time, before the next queued request starts).

    [plugins.archive]
    dir = "/var/lib/voiced/archive"
    max_mb = 1024
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from voiced.fsutil import atomic_write, fsync_dir
from voiced.hooks import PluginSettings, hookimpl

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-archive-"
_SUFFIXES = (".wav", ".json")
_OURS = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-")  # only files the archive named are counted or deleted


@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):
    dir: Path
    """The archive folder (created when missing)."""
    max_mb: float = 1024.0
    """Size cap of the archive in MiB; the oldest replies go first (0 = no cap)."""

    def __post_init__(self) -> None:
        if self.max_mb < 0:
            raise ValueError(f"max_mb: must not be negative, got {self.max_mb}")


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("._")[:60] or "voice"


class Archive:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = Path(settings.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(settings.max_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # stem -> bytes of its files; stems sort oldest first
        self._total = 0
        self._scan()

    def _scan(self) -> None:
        for entry in os.scandir(self.dir):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.name.startswith(_TMP_PREFIX):
                try:
                    os.unlink(entry.path)  # a crash's leftover
                except OSError:
                    pass
                continue
            stem, suffix = os.path.splitext(entry.name)
            if suffix in _SUFFIXES and _OURS.match(stem):
                size = entry.stat(follow_symlinks=False).st_size
                self._sizes[stem] = self._sizes.get(stem, 0) + size
                self._total += size
        self._enforce_cap()

    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def save(self, request: dict[str, Any], audio: np.ndarray, sample_rate: int, timings: dict[str, Any]) -> Path:
        now = time.time()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        voice = request.get("voice") or {}
        stem = f"{stamp}-{_safe(str(voice.get('name') or 'voice'))}-{str(request.get('key') or os.urandom(4).hex())[:8]}"
        wav = io.BytesIO()
        sf.write(wav, np.asarray(audio, dtype=np.float32).reshape(-1), sample_rate, format="WAV", subtype="PCM_16")
        wav_bytes = wav.getvalue()
        meta = {
            "created": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "wav": f"{stem}.wav",
            "id": request.get("id"),
            "text": request.get("text"),
            "spoken_text": request.get("spoken_text", request.get("text")),
            "voice": voice,
            "params": request.get("params") or {},
            "format": request.get("format"),
            "stream": bool(request.get("stream")),
            "sample_rate": sample_rate,
            "duration_s": round(len(audio) / sample_rate, 4) if sample_rate else None,
            "timings": timings,
        }
        meta_bytes = (json.dumps(meta, ensure_ascii=False, indent=1, default=str) + "\n").encode()
        atomic_write(self.dir / f"{stem}.wav", wav_bytes, tmp_prefix=_TMP_PREFIX)
        atomic_write(self.dir / f"{stem}.json", meta_bytes, tmp_prefix=_TMP_PREFIX)
        fsync_dir(self.dir)
        with self._lock:
            self._sizes[stem] = len(wav_bytes) + len(meta_bytes)
            self._total += len(wav_bytes) + len(meta_bytes)
            self._enforce_cap()
        return self.dir / f"{stem}.wav"

    def _enforce_cap(self) -> None:
        if not self.max_bytes or self._total <= self.max_bytes:
            return
        for stem in sorted(self._sizes)[:-1]:  # oldest first; the newest is kept
            if self._total <= self.max_bytes:
                break
            for suffix in _SUFFIXES:
                try:
                    os.unlink(self.dir / f"{stem}{suffix}")
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("archive: cannot delete %s%s: %s", stem, suffix, exc)
            self._total -= self._sizes.pop(stem)

    @hookimpl
    def voiced_synthesis_done(self, request: dict[str, Any], audio: np.ndarray, sample_rate: int, timings: dict[str, Any]) -> None:
        self.save(request, audio, sample_rate, timings)


def plugin(settings: Settings) -> Archive:
    return Archive(settings)
