"""Tune a voice's EQ gains by gradient ascent on the GE2E cosine, through the encoder itself.

The band gains of post.py act on the audio as a smooth filter, so on the encoder's 25 ms STFT
frames they are (to a good approximation) a per-bin scaling of the power spectrum. The speech is
therefore analysed once; each step rescales its power spectrogram, runs the GE2E mel filterbank
and LSTM (an fp32 copy, whatever precision the daemon's encoder runs in) and follows the cosine's
gradient. No synthesis is needed, so tens of steps cost a few seconds, and the gains move to
what the encoder hears as the speaker rather than only matching the long-term spectrum.

Needs voiced.encoder.SpeakerEncoder (its mel front end and model); with any other encoder
``EqTuner.create`` returns None and the fitted voice keeps its matched EQ.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from voiced.engines.kokoro import post

log = logging.getLogger(__name__)

STEPS = 80
LEARNING_RATE = 0.5  # dB per Adam step
L2 = 0.0005  # cosine points per mean squared dB moved from the matched EQ


def _interp_matrix(freqs: np.ndarray) -> np.ndarray:
    """(n_freqs, N_BANDS) weights: the same log-frequency interpolation as post.eq_filter.

    np.interp is linear in the values interpolated, so interpolating each band's unit vector
    gives that band's column.
    """
    x = np.log(np.maximum(freqs, 1.0))
    centres = np.log(post.BAND_CENTRES)
    return np.stack([np.interp(x, centres, unit) for unit in np.eye(len(centres))], axis=1)


class EqTuner:
    """Differentiable view of a voiced SpeakerEncoder, built once per fitter."""

    def __init__(self, encoder: Any) -> None:
        import torch

        from voiced import encoder as ge2e

        self._torch = torch
        self._ge2e = ge2e
        self._window = encoder._frontend.window.detach().to("cpu", torch.float32)
        self._filters = encoder._frontend.filters.detach().to("cpu", torch.float32)
        model = copy.deepcopy(encoder._model).to("cpu").float().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model
        freqs = np.linspace(0.0, ge2e.SAMPLE_RATE / 2, ge2e.N_FFT // 2 + 1)
        self._interp = torch.tensor(_interp_matrix(freqs), dtype=torch.float32)

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

    def _spectrogram(self, wav16k: np.ndarray) -> tuple[Any, list[int]] | None:
        torch, ge2e = self._torch, self._ge2e
        wav = ge2e.preprocess_wav(np.asarray(wav16k, dtype=np.float32))
        if len(wav) < ge2e.MIN_SAMPLES:
            return None
        starts = ge2e.partial_starts(len(wav))
        needed = (starts[-1] + ge2e.PARTIAL_FRAMES) * ge2e.HOP
        wav = np.pad(wav, (0, max(0, needed - len(wav))))
        spec = torch.stft(torch.from_numpy(wav), n_fft=ge2e.N_FFT, hop_length=ge2e.HOP, window=self._window,
                          center=True, pad_mode="constant", return_complex=True)
        return torch.view_as_real(spec).square().sum(-1), starts

    def tune(
        self,
        audio24k: Sequence[np.ndarray],
        gains_db: np.ndarray,
        target: np.ndarray,
        *,
        steps: int = STEPS,
        deadline: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, float, float, int]:
        """(gains, cosine before, cosine after, steps taken) for speech ``audio24k`` (without EQ).

        Deterministic for given inputs unless ``deadline`` (perf_counter time) or ``should_stop``
        cuts it short; the best gains seen are returned.
        """
        from voiced.engines.kokoro.fitting import resample_24k_to_16k

        torch, ge2e = self._torch, self._ge2e
        g0 = np.clip(np.asarray(gains_db, dtype=np.float64), post.MIN_GAIN_DB, post.MAX_GAIN_DB)
        specs = [s for s in (self._spectrogram(resample_24k_to_16k(post.apply_eq(a, g0))) for a in audio24k) if s is not None]
        t = torch.tensor(np.asarray(target, np.float64) / (np.linalg.norm(target) + 1e-12), dtype=torch.float32)
        if not specs:
            return g0, float("nan"), float("nan"), 0
        base = torch.tensor(g0, dtype=torch.float32)
        delta = torch.zeros(len(g0), dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=LEARNING_RATE)
        best = (g0, -2.0)
        first = float("nan")
        taken = 0
        with torch.enable_grad():
            for taken in range(steps + 1):
                scale = 10 ** ((self._interp @ delta) / 10)
                embs = []
                for power, starts in specs:
                    shaped = power * scale[:, None]
                    shaped = shaped * (power.sum() / shaped.sum())  # the encoder normalises volume
                    mel = (self._filters @ shaped).T
                    step = starts[1] - starts[0] if len(starts) > 1 else 1
                    partials = mel.unfold(0, ge2e.PARTIAL_FRAMES, step)[: len(starts)].transpose(1, 2).contiguous()
                    e = self._model(partials).mean(dim=0)
                    embs.append(e / e.norm().clamp_min(1e-12))
                cos = torch.stack(embs).mean(dim=0) @ t
                value = float(cos.detach())
                if taken == 0:
                    first = value
                if value > best[1]:
                    best = (np.clip(g0 + delta.detach().numpy().astype(np.float64), post.MIN_GAIN_DB, post.MAX_GAIN_DB), value)
                if taken == steps or (should_stop is not None and should_stop()) or (deadline is not None and time.perf_counter() > deadline):
                    break
                loss = -cos + L2 * delta.square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():  # keep the total within the clip range
                    delta.copy_(torch.clamp(base + delta, post.MIN_GAIN_DB, post.MAX_GAIN_DB) - base)
        return best[0], first, best[1], taken


__all__ = ["EqTuner"]
