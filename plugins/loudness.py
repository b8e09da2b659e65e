"""loudness: normalise replies to a target integrated loudness under a true-peak ceiling.

Loudness is measured per ITU-R BS.1770-4 (K-weighting, 400 ms blocks, absolute and relative
gating) with pyloudnorm; true peak is approximated on a 4x oversampled signal. The reply is
scaled to ``target_lufs``; where that would push the true peak above ``true_peak_db`` a
smooth peak limiter (5 ms attack/hold and release, no clipping) lowers only the peaks, and
the gain is refined so the loudness still lands on the target (peaks are limited by at most
12 dB; a target that needs more ends up quieter, logged at debug level). With ``limiter = false`` the
whole reply is lowered instead (the ceiling wins; the reply ends up quieter than the target).

Whole replies are measured as a whole. Streamed replies: the gain is fixed from the first
chunk (one sentence; shorter than 400 ms is measured as one ungated block) and kept for the
rest of the stream, so the level does not pump between sentences; each chunk is
peak-limited on its own. Signals shorter than 50 ms, or silent (below -70 LUFS), are left
unchanged (logged at debug level). Gains are capped at ``max_gain_db`` so near-silence is
not boosted into noise.

    [plugins.loudness]
    target_lufs = -16.0     # EBU R 128 is -23, podcasts/voice assistants ~ -16
    true_peak_db = -1.0     # dBTP ceiling
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyloudnorm
from scipy.ndimage import minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly

from voiced.hooks import PluginSettings, hookimpl

log = logging.getLogger(__name__)

GATED_MIN_S = 0.4
"""BS.1770's gating block: shorter signals are measured as one ungated block."""
SHORTEST_S = 0.05
"""Shorter than this is left alone: too little to measure."""
SILENCE_LUFS = -70.0
MAX_LIMIT_DB = 12.0
"""Peaks are limited by at most this much to reach the target; beyond, the reply stays quieter."""
OVERSAMPLE = 4
_STREAMS_KEPT = 256


@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):
    target_lufs: float = -16.0
    """Integrated loudness to normalise to, in LUFS."""
    true_peak_db: float = -1.0
    """True-peak ceiling in dBTP (4x oversampled)."""
    limiter: bool = True
    """Limit peaks over the ceiling (true) or lower the whole reply until it fits (false)."""
    max_gain_db: float = 30.0
    """Never amplify by more than this (keeps near-silence from being boosted into noise)."""

    def __post_init__(self) -> None:
        if not -70.0 <= self.target_lufs <= 0.0:
            raise ValueError(f"target_lufs: must be within -70..0, got {self.target_lufs}")
        if not -30.0 <= self.true_peak_db <= 0.0:
            raise ValueError(f"true_peak_db: must be within -30..0, got {self.true_peak_db}")
        if self.max_gain_db < 0:
            raise ValueError(f"max_gain_db: must not be negative, got {self.max_gain_db}")


def integrated_loudness(audio: np.ndarray, sample_rate: int) -> float | None:
    """BS.1770 integrated loudness in LUFS; None when too short or silent."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    duration = len(x) / sample_rate
    if duration < SHORTEST_S:
        return None
    if duration >= GATED_MIN_S:
        meter = pyloudnorm.Meter(sample_rate)
    else:  # one ungated block over the whole signal
        meter = pyloudnorm.Meter(sample_rate, block_size=len(x) / sample_rate)
    lufs = float(meter.integrated_loudness(x))
    if not np.isfinite(lufs) or lufs < SILENCE_LUFS:
        return None
    return lufs


def true_peak(audio: np.ndarray) -> float:
    """Approximate true peak (linear): the largest magnitude of the 4x oversampled signal."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if not len(x):
        return 0.0
    up = resample_poly(x, OVERSAMPLE, 1)
    return float(max(np.max(np.abs(up)), np.max(np.abs(x))))


def limit(audio: np.ndarray, sample_rate: int, ceiling: float) -> np.ndarray:
    """Lower the peaks whose true peak exceeds ``ceiling`` (linear), smoothly, without clipping.

    The gain needed at every oversampled point is reduced to one value per sample, spread by
    a minimum filter (attack/hold) and smoothed by a moving average of the same half-width,
    which never exceeds the gain needed anywhere (each averaged minimum covers the point).
    A last uniform scale catches what the gain's own modulation adds.
    """
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    n = len(x)
    if not n:
        return x
    up = np.abs(resample_poly(x, OVERSAMPLE, 1))[: n * OVERSAMPLE]
    need = np.minimum(1.0, ceiling / np.maximum(up, 1e-12)).reshape(n, OVERSAMPLE).min(axis=1)
    need = np.minimum(need, np.minimum(1.0, ceiling / np.maximum(np.abs(x), 1e-12)))
    if need.min() >= 1.0:
        return x
    half = max(1, int(sample_rate * 0.005))
    gain = minimum_filter1d(need, size=2 * half + 1, mode="nearest")
    gain = uniform_filter1d(gain, size=2 * half + 1, mode="nearest")
    y = x * gain
    peak = true_peak(y)
    if peak > ceiling:
        y *= ceiling / peak
    return y


class Loudness:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ceiling = 10 ** (settings.true_peak_db / 20)
        self._streams: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def gain_db(self, audio: np.ndarray, sample_rate: int) -> float | None:
        lufs = integrated_loudness(audio, sample_rate)
        if lufs is None:
            log.debug("loudness: %.0f ms of audio is too short or silent to measure; left unchanged",
                      1000 * len(audio) / sample_rate)
            return None
        return min(self.settings.target_lufs - lufs, self.settings.max_gain_db)

    def apply(self, audio: np.ndarray, sample_rate: int, gain_db: float, *, refine: bool) -> np.ndarray:
        x = np.asarray(audio, dtype=np.float64)
        y = x * 10 ** (gain_db / 20)
        if true_peak(y) <= self.ceiling:
            return y
        if not self.settings.limiter:
            return y * (self.ceiling / true_peak(y))
        y = limit(y, sample_rate, self.ceiling)
        if not refine:
            return y
        # limiting lowered the loudness: find the gain that lands on the target after limiting
        # (secant steps on gain -> loudness, which is monotonic), limiting at most MAX_LIMIT_DB
        target = self.settings.target_lufs
        lufs = integrated_loudness(y, sample_rate)
        if lufs is None:
            return y
        points = [(gain_db, lufs)]
        gain = gain_db + (target - lufs)
        for _ in range(8):
            if abs(target - points[-1][1]) < 0.05:
                break
            gain = min(gain, gain_db + MAX_LIMIT_DB)
            if gain <= points[-1][0]:
                break
            candidate = limit(x * 10 ** (gain / 20), sample_rate, self.ceiling)
            lufs = integrated_loudness(candidate, sample_rate)
            if lufs is None:
                break
            y = candidate
            points.append((gain, lufs))
            (g0, l0), (g1, l1) = points[-2], points[-1]
            slope = min(max((l1 - l0) / (g1 - g0), 0.05), 1.0)
            gain = g1 + (target - l1) / slope
        if abs(target - points[-1][1]) >= 0.5:
            log.debug("loudness: %.1f LUFS instead of %.1f: the %.1f dBTP ceiling allows no more",
                      points[-1][1], target, self.settings.true_peak_db)
        return y

    @hookimpl
    def voiced_postprocess_audio(self, audio: np.ndarray, sample_rate: int, request: dict[str, Any]) -> np.ndarray | None:
        if not request.get("stream"):
            gain = self.gain_db(audio, sample_rate)
            return None if gain is None else self.apply(audio, sample_rate, gain, refine=True)
        key = str(request.get("key"))
        if request.get("final") and not len(audio):
            with self._lock:
                self._streams.pop(key, None)
            return None
        with self._lock:
            gain = self._streams.get(key)
        if gain is None:  # first chunk (or the earlier ones were silent): fix the gain now
            gain = self.gain_db(audio, sample_rate)
            if gain is not None:
                with self._lock:
                    self._streams[key] = gain
                    while len(self._streams) > _STREAMS_KEPT:  # streams that failed before their final call
                        self._streams.popitem(last=False)
        if gain is None:
            return None
        return self.apply(audio, sample_rate, gain, refine=False)


def plugin(settings: Settings) -> Loudness:
    return Loudness(settings)
