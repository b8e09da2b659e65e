"""trim: cut leading and trailing silence, then fade the edges and pad with exact silence.

Silence is measured in 10 ms frames: the reply starts at the first frame whose RMS reaches
``threshold_db`` (dBFS) and ends after the last one; ``keep_ms`` of the quiet before and
after is kept so soft onsets and release tails are not clipped. Then ``fade_ms`` fades in
and out (raised cosine), and ``pad_start_ms`` / ``pad_end_ms`` of digital silence are added.
A reply that is silent throughout is left unchanged.

Streamed replies: the first chunk gets the start treatment (trim, fade in, pad); the final
call (an empty chunk) returns the end padding. Trailing silence inside already-sent chunks
cannot be trimmed, so streams keep the engine's own end silence.

    [plugins.trim]
    threshold_db = -50.0
    keep_ms = 20
    fade_ms = 10
    pad_start_ms = 50
    pad_end_ms = 100
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from voiced.hooks import PluginSettings, hookimpl

FRAME_S = 0.010


@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):
    threshold_db: float = -50.0
    """Frames quieter than this RMS (dBFS) at either end count as silence."""
    keep_ms: float = 20.0
    """Quiet kept before the first and after the last loud frame."""
    fade_ms: float = 10.0
    """Fade-in and fade-out length (0 = none)."""
    pad_start_ms: float = 50.0
    """Silence added before the speech."""
    pad_end_ms: float = 100.0
    """Silence added after the speech."""

    def __post_init__(self) -> None:
        if not -120.0 <= self.threshold_db < 0.0:
            raise ValueError(f"threshold_db: must be within -120..0, got {self.threshold_db}")
        for key in ("keep_ms", "fade_ms", "pad_start_ms", "pad_end_ms"):
            value = getattr(self, key)
            if not 0.0 <= value <= 10_000.0:
                raise ValueError(f"{key}: must be within 0..10000, got {value}")


def speech_bounds(audio: np.ndarray, sample_rate: int, threshold_db: float) -> tuple[int, int] | None:
    """(start, end) sample indices of the non-silent part, at frame resolution; None if all silent."""
    frame = max(1, int(round(sample_rate * FRAME_S)))
    n = len(audio)
    if not n:
        return None
    frames = -(-n // frame)
    padded = np.zeros(frames * frame, dtype=np.float64)
    padded[:n] = audio
    rms = np.sqrt(np.mean(padded.reshape(frames, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms >= 10 ** (threshold_db / 20))
    if not len(loud):
        return None
    return int(loud[0] * frame), int(min(n, (loud[-1] + 1) * frame))


def _fade(n: int) -> np.ndarray:
    """Raised-cosine ramp from ~0 to ~1 over ``n`` samples."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


class Trim:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _samples(self, ms: float, sample_rate: int) -> int:
        return int(round(ms * sample_rate / 1000))

    def process(self, audio: np.ndarray, sample_rate: int, *, start: bool, end: bool) -> np.ndarray | None:
        s = self.settings
        bounds = speech_bounds(audio, sample_rate, s.threshold_db)
        if bounds is None:
            return None
        keep = self._samples(s.keep_ms, sample_rate)
        lo, hi = (max(0, bounds[0] - keep) if start else 0), (min(len(audio), bounds[1] + keep) if end else len(audio))
        y = np.array(audio[lo:hi], dtype=np.float32)
        fade = min(self._samples(s.fade_ms, sample_rate), len(y) // 2)
        if fade:
            ramp = _fade(fade)
            if start:
                y[:fade] *= ramp
            if end:
                y[-fade:] *= ramp[::-1]
        head = np.zeros(self._samples(s.pad_start_ms, sample_rate) if start else 0, dtype=np.float32)
        tail = np.zeros(self._samples(s.pad_end_ms, sample_rate) if end else 0, dtype=np.float32)
        return np.concatenate([head, y, tail])

    @hookimpl
    def voiced_postprocess_audio(self, audio: np.ndarray, sample_rate: int, request: dict[str, Any]) -> np.ndarray | None:
        if not request.get("stream"):
            return self.process(audio, sample_rate, start=True, end=True)
        if request.get("final") and not len(audio):
            return np.zeros(self._samples(self.settings.pad_end_ms, sample_rate), dtype=np.float32)
        if request.get("seq", 0) == 0:
            return self.process(audio, sample_rate, start=True, end=bool(request.get("final")))
        return None


def plugin(settings: Settings) -> Trim:
    return Trim(settings)
