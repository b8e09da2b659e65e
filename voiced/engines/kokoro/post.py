"""Per-voice signal processing after the model: a pitch/formant warp and a spectral-envelope EQ.

A fitted voice carries up to three small arrays beside its style pack (together, a ``Voicing``):

* ``pitch`` (shape (1,)): a factor on the F0 curve inside the model (graph.py), so the pitch
  moves without the formants.

* ``warp`` (shape (1,)): a factor that scales pitch and formants together (a vocal-tract-length
  change). The model speaks at ``speed / warp`` and the audio is resampled by ``warp``, so the
  duration is unchanged.
* ``eq`` (shape (N_BANDS,)): gains in dB at fixed log-spaced band centres between 100 Hz and
  7.6 kHz, interpolated (in log frequency) into one linear-phase FIR. Fitted so the long-term
  spectrum of the voice's speech matches the reference recording's: the colour of the speaker's
  voice and of the channel it was recorded through, which the five base styles cannot reach.

Both are deterministic and cheap (one resample and one FFT convolution per sentence).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from voiced.audio import SAMPLE_RATE as ENCODER_RATE
from voiced.audio import resample

SAMPLE_RATE = 24_000
BAND_EDGES = np.geomspace(100.0, 7600.0, 25)
BAND_CENTRES = np.sqrt(BAND_EDGES[:-1] * BAND_EDGES[1:])
N_BANDS = len(BAND_CENTRES)
# Fitted gains lie in [MIN_GAIN_DB, MAX_GAIN_DB]: deeper cuts would follow band-limited
# references for a little similarity and cost much intelligibility.
MAX_GAIN_DB = 12.0
MIN_GAIN_DB = -12.0
LIMIT_DB = 60.0  # what a conditioning may hold at all
WARP_RANGE = (0.8, 1.25)
PITCH_RANGE = (0.7, 1.4)  # of the model's F0 curve; beyond it the harmonic source sounds strained
FIR_TAPS = 1024
_ACTIVE_PERCENTILE = 40  # frames quieter than this percentile (pauses, breaths) are left out


class Voicing(NamedTuple):
    """What a voice sets beside its style pack; the defaults change nothing."""

    warp: float = 1.0  # pitch and formants together, by resampling after the model
    pitch: float = 1.0  # the model's F0 curve alone
    eq: np.ndarray | None = None  # band gains in dB, after the model


def band_powers(audio: np.ndarray, sr: int) -> np.ndarray:
    """Mean power per band over the louder frames: the long-term spectrum in N_BANDS bands."""
    from scipy.signal import stft

    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    nfft = int(round(sr / 15.625))  # same 15.6 Hz resolution at any rate (1024 at 16 kHz)
    if len(audio) < nfft:
        audio = np.pad(audio, (0, nfft - len(audio)))
    freqs, _, spec = stft(audio, fs=sr, nperseg=nfft, noverlap=nfft * 3 // 4, boundary=None, padded=False)
    power = np.abs(spec) ** 2
    energy = power.sum(axis=0)
    keep = energy >= np.percentile(energy, _ACTIVE_PERCENTILE)
    ltas = power[:, keep].mean(axis=1) if keep.any() else power.mean(axis=1)
    out = np.empty(N_BANDS)
    for i, (lo, hi) in enumerate(zip(BAND_EDGES[:-1], BAND_EDGES[1:])):
        sel = (freqs >= lo) & (freqs < hi)
        out[i] = ltas[sel].mean() if sel.any() else np.interp(BAND_CENTRES[i], freqs, ltas)
    return out + 1e-12


def match_gains(target_bands: np.ndarray, source_bands: np.ndarray) -> np.ndarray:
    """dB gains turning the source's long-term spectrum into the target's, total power kept."""
    target = np.asarray(target_bands, dtype=np.float64)
    source = np.asarray(source_bands, dtype=np.float64)
    gains = 10 * np.log10(target / source)
    gains -= 10 * np.log10(np.sum(source * 10 ** (gains / 10)) / np.sum(source))
    return np.clip(gains, MIN_GAIN_DB, MAX_GAIN_DB)


def eq_filter(gains_db: np.ndarray, taps: int = FIR_TAPS, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Linear-phase FIR (``taps`` long, Hann-windowed) with the given band gains."""
    freqs = np.linspace(0.0, sr / 2, taps // 2 + 1)
    gains = np.interp(np.log(np.maximum(freqs, 1.0)), np.log(BAND_CENTRES), np.asarray(gains_db, dtype=np.float64))
    h = np.fft.irfft(10 ** (gains / 20), taps)
    return np.roll(h, taps // 2) * np.hanning(taps)


def eq_interpolation(freqs: np.ndarray) -> np.ndarray:
    """(n_freqs, N_BANDS) weights: the log-frequency interpolation of eq_filter as a matrix, so
    a differentiable fit can turn band gains into per-frequency gains (np.interp is linear in
    the values, so each band's unit vector interpolated gives that band's column)."""
    x = np.log(np.maximum(np.asarray(freqs, dtype=np.float64), 1.0))
    centres = np.log(BAND_CENTRES)
    return np.stack([np.interp(x, centres, unit) for unit in np.eye(len(centres))], axis=1)


def apply_eq(audio: np.ndarray, gains_db: np.ndarray | None) -> np.ndarray:
    if gains_db is None or not np.any(gains_db):
        return np.asarray(audio, dtype=np.float32)
    from scipy.signal import oaconvolve

    audio = np.asarray(audio, dtype=np.float64)
    if len(audio) == 0:
        return audio.astype(np.float32)
    out = oaconvolve(audio, eq_filter(gains_db), mode="same")
    return out.astype(np.float32)


def apply_warp(audio: np.ndarray, warp: float) -> np.ndarray:
    """Scale pitch and formants by ``warp`` (and the duration by 1 / warp) by resampling."""
    if warp == 1.0 or len(audio) == 0:
        return np.asarray(audio, dtype=np.float32)
    import soxr

    return soxr.resample(np.asarray(audio, dtype=np.float32), SAMPLE_RATE * warp, SAMPLE_RATE, quality="HQ").astype(np.float32)


def finish(audio: np.ndarray, warp: float, gains_db: np.ndarray | None) -> np.ndarray:
    """Model output (spoken at speed / warp) -> the voice's audio, clipped to [-1, 1]."""
    out = apply_eq(apply_warp(audio, warp), gains_db)
    return np.nan_to_num(np.clip(out, -1.0, 1.0), nan=0.0)


def resample_24k_to_16k(audio: np.ndarray) -> np.ndarray:
    """The engine's 24 kHz speech at the speaker encoder's 16 kHz."""
    return resample(audio, SAMPLE_RATE, ENCODER_RATE)


__all__ = ["BAND_CENTRES", "LIMIT_DB", "MAX_GAIN_DB", "MIN_GAIN_DB", "N_BANDS", "PITCH_RANGE", "WARP_RANGE", "Voicing", "apply_eq", "apply_warp", "band_powers",
           "eq_filter", "eq_interpolation", "finish", "match_gains", "resample_24k_to_16k"]
