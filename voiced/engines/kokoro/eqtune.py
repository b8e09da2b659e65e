"""Tune a voice's EQ gains by gradient ascent on the GE2E cosine, through the encoder itself.

The speech is synthesized once. Each step filters it with the EQ the gains describe (the same
linear-phase FIR design as post.eq_filter, at the encoder's 16 kHz: filtering and resampling
commute), normalises its volume as the encoder does, drops the silences the encoder dropped for
the starting EQ, and runs the GE2E mel front end and LSTM (an fp32 copy, whatever precision the
daemon's encoder runs in) to follow the cosine's gradient. No synthesis is needed, so tens of
steps cost a few seconds, and the gains move to what the encoder hears as the speaker rather
than only matching the long-term spectrum.

The filter is applied exactly rather than as a per-bin scaling of a spectrogram: the EQ's bands
are narrower than the encoder's 25 ms frames resolve at low frequencies, and the scaling
overstated what tuned gains were worth.

Needs voiced.encoder.SpeakerEncoder (its mel front end and model); with any other encoder
``EqTuner.create`` returns None and the fitted voice keeps its matched EQ.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy.fft import next_fast_len

from voiced.engines.kokoro import post

log = logging.getLogger(__name__)

STEPS = 120  # enough for held-out similarity to settle on every test speaker
LEARNING_RATE = 0.5  # dB per Adam step
L2 = 0.0005  # cosine points per mean squared dB moved from the matched EQ


FIR_TAPS_16K = round(post.FIR_TAPS * 16_000 / post.SAMPLE_RATE / 2) * 2  # the same length in time


class _Sentence(NamedTuple):
    spectrum: Any  # rfft of the 16 kHz speech before the EQ, zero padded to n_fft (torch)
    n_fft: int  # room for the speech and the filter: no circular wrap
    length: int  # samples of speech
    keep: Any  # sample indices the encoder keeps (long silences dropped), torch int64
    starts: list[int]  # partial windows, in frames of the kept speech


class EqTuner:
    """Differentiable view of a voiced SpeakerEncoder, built once per fitter."""

    def __init__(self, encoder: Any) -> None:
        import torch

        from voiced import encoder as ge2e

        self._torch = torch
        self._ge2e = ge2e
        self._frontend = ge2e.MelFrontEnd(torch.device("cpu"))
        model = copy.deepcopy(encoder._model).to("cpu").float().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model
        freqs = np.linspace(0.0, ge2e.SAMPLE_RATE / 2, FIR_TAPS_16K // 2 + 1)
        self._interp = torch.tensor(post.eq_interpolation(freqs), dtype=torch.float32)
        self._taper = torch.tensor(np.hanning(FIR_TAPS_16K), dtype=torch.float32)

    @classmethod
    def create(cls, encoder: Any) -> EqTuner | None:
        try:
            from voiced.encoder import SpeakerEncoder
        except ImportError:  # pragma: no cover - the daemon always has it
            return None
        if not isinstance(encoder, SpeakerEncoder):
            return None
        try:
            return cls(encoder)
        except Exception as exc:  # noqa: BLE001 - an encoder of another shape only costs the tuning
            log.warning("EQ tuning unavailable: %s", exc)
            return None

    def _sentence(self, audio24k: np.ndarray, gains_db: np.ndarray) -> _Sentence | None:
        """The speech as the tuner needs it; which silences go is decided with ``gains_db`` applied."""
        torch, ge2e = self._torch, self._ge2e
        wav = post.resample_24k_to_16k(audio24k)
        mask = ge2e.long_silence_mask(ge2e.normalize_volume(post.resample_24k_to_16k(post.apply_eq(audio24k, gains_db))))
        kept = int(mask.sum())
        if kept < ge2e.MIN_SAMPLES:
            return None
        n_fft = next_fast_len(len(wav) + FIR_TAPS_16K - 1, real=True)
        spectrum = torch.fft.rfft(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), n_fft)
        return _Sentence(spectrum, n_fft, len(wav), torch.from_numpy(np.flatnonzero(mask)), ge2e.partial_starts(kept))

    def _fir(self, gains_db: Any) -> Any:
        """post.eq_filter at 16 kHz, in torch (so the gains get a gradient)."""
        torch = self._torch
        h = torch.fft.irfft(10 ** ((self._interp @ gains_db) / 20), FIR_TAPS_16K)
        return torch.roll(h, FIR_TAPS_16K // 2) * self._taper

    def _partials(self, sentence: _Sentence, fir: Any) -> Any:
        """Mel partial windows (n, frames, mels) of ``sentence`` filtered by ``fir`` and
        preprocessed as the encoder does."""
        torch, ge2e = self._torch, self._ge2e
        n = sentence.n_fft
        full = torch.fft.irfft(sentence.spectrum * torch.fft.rfft(fir, n), n)
        y = full[(len(fir) - 1) // 2 :][: sentence.length]  # "same" alignment, as scipy's oaconvolve
        # normalize_volume: raise (never lower) the RMS to the encoder's target level
        rms = y.square().mean().sqrt().clamp_min(1e-9)
        y = y * torch.clamp(10 ** (ge2e.TARGET_DBFS / 20) / rms, min=1.0)
        return ge2e.mel_partials(self._frontend, y[sentence.keep], sentence.starts)

    def cosine(self, sentences: Sequence[_Sentence], gains_db: Any, target: Any) -> Any:
        """Mean over ``sentences`` of the cosine of each one's embedding (with the EQ) to ``target``."""
        torch = self._torch
        fir = self._fir(gains_db)
        # one LSTM call for all sentences' partials: much quicker on a CPU than one per sentence
        out = self._model(torch.cat([self._partials(s, fir) for s in sentences]).contiguous())
        embs = torch.stack([e.mean(dim=0) for e in out.split([len(s.starts) for s in sentences])])
        embs = embs / embs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (embs @ target).mean()

    def tune(
        self,
        audio24k: Sequence[np.ndarray],
        gains_db: np.ndarray,
        target: np.ndarray,
        *,
        steps: int = STEPS,
        deadline: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> tuple[np.ndarray, float, float, int]:
        """(gains, cosine before, cosine after, steps taken) for speech ``audio24k`` (without EQ).

        The cosine is the mean over the sentences of each one's cosine to ``target``.
        Deterministic for given inputs unless ``deadline`` (a ``clock()`` time) or ``should_stop``
        cuts it short; the best gains seen are returned.
        """
        torch = self._torch
        g0 = np.clip(np.asarray(gains_db, dtype=np.float64), post.MIN_GAIN_DB, post.MAX_GAIN_DB)
        sentences = [s for s in (self._sentence(a, g0) for a in audio24k) if s is not None]
        t = torch.tensor(np.asarray(target, np.float64) / (np.linalg.norm(target) + 1e-12), dtype=torch.float32)
        if not sentences:
            return g0, float("nan"), float("nan"), 0
        base = torch.tensor(g0, dtype=torch.float32)
        delta = torch.zeros(len(g0), dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=LEARNING_RATE)
        best = (g0, -2.0)
        first = float("nan")
        taken = 0
        with torch.enable_grad():
            for taken in range(steps + 1):
                cos = self.cosine(sentences, base + delta, t)
                value = float(cos.detach())
                if taken == 0:
                    first = value
                if value > best[1]:
                    best = (np.clip(g0 + delta.detach().numpy().astype(np.float64), post.MIN_GAIN_DB, post.MAX_GAIN_DB), value)
                if taken == steps or (should_stop is not None and should_stop()) or (deadline is not None and clock() > deadline):
                    break
                loss = -cos + L2 * delta.square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():  # keep the total within the clip range
                    delta.copy_(torch.clamp(base + delta, post.MIN_GAIN_DB, post.MAX_GAIN_DB) - base)
        return best[0], first, best[1], taken


__all__ = ["EqTuner"]
