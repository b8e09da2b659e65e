"""Voice fitting by gradient through the torch network: the refine stage on the torch backend.

From the quick voice, Adam moves an offset of the whole style pack (both halves, in units of
the base styles' spread per dimension), the factor on the model's F0 curve and the EQ gains,
with the quick voice's durations held fixed (rounding them has no gradient). The fit's speech is
brought to 16 kHz and to the reference's bandwidth in one FFT, EQ included, before it is
compared, so a telephone reference is matched by a voice that sounds like the speaker through a
telephone, not by a voice that sounds like a telephone: gains above the reference's band stay
at 0 dB and the voice stays wideband.

No single speaker model is the objective (a fit to one learns that model, not the speaker):
GE2E's cosine to the reference sits beside model-free views, the long-term spectrum's shape
in band and the F0 distribution (mean and spread of log F0 against the reference's), and a
penalty on leaving the base styles' region, which keeps the speech intelligible.
"""

from __future__ import annotations

import copy
import ctypes
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from voiced.engines.kokoro import post

log = logging.getLogger(__name__)

# One step: a window of CROP_S of each of CROPS_PER_STEP fit sentences decoded, compared and
# back-propagated, then one Adam update. What it costs on a 2-core x86 CPU (torch fp32), to turn
# a budget into steps.
STEP_COST_S = 6.0
MAX_STEPS = 48
TUNING_SENTENCES = 7  # fit on the calibration sentence and this many of the tuning sentences
CROPS_PER_STEP = 4
CROP_S = 2.0
CONTEXT_FRAMES = 4  # decoded either side of a window and cut (100 ms)
NOISE_SNR_DB = (25.0, 40.0)
SEED = 0  # the windows and the noise: the same reference gives the same voice
WEIGHTS = {"ge2e": 1.0, "ltas": 1.0, "f0": 1.0, "mfcc": 0.0, "prior": 0.02}
MFCC = 20  # cepstra c1..c19 (c0, the level, left out) over 40 mel bands of the reference's channel
LEARNING_RATES = {"offset": 0.08, "log_pitch": 0.01, "eq": 0.4}
MIN_BAND_HZ, MAX_BAND_HZ = 3000.0, 7600.0
CLIFF_DB = 20.0  # a band this far under the one before it is past the reference's channel
ROLL_OFF_DB = 6.0  # ... and the band before that, if it already lies this far under its neighbour
F0_RANGE_HZ = (60.0, 500.0)
SILENCE = 1e-3  # a frame 30 dB under the loudest holds no voice to track


def reference_bandwidth(ref_bands: np.ndarray) -> float:
    """Where the reference's channel ends (Hz): the lower edge of the first band that falls more
    than CLIFF_DB under the one before (no voice drops so fast; an anti-alias filter does), or
    of the band before it when that one is already rolling off; the top band's edge if none."""
    db = 10 * np.log10(np.maximum(np.asarray(ref_bands, np.float64), 1e-20))
    edge = post.BAND_EDGES[-1]
    cliffs = np.flatnonzero(db[1:] < db[:-1] - CLIFF_DB) + 1
    if len(cliffs):
        k = int(cliffs[0])
        edge = post.BAND_EDGES[k - 1] if k >= 2 and db[k - 1] < db[k - 2] - ROLL_OFF_DB else post.BAND_EDGES[k]
    return float(np.clip(edge, MIN_BAND_HZ, MAX_BAND_HZ))


def f0_track(audio16k: np.ndarray, window: int = 512, hop: int = 160, threshold: float = 0.15) -> np.ndarray:
    """F0 (Hz) of the voiced frames of 16 kHz speech, by YIN (de Cheveigne and Kawahara, 2002).

    Per frame, the difference function over ``window`` samples, normalised by its running mean:
    the first dip under ``threshold`` within F0_RANGE_HZ (then down to its minimum) is the
    period, refined by a parabola. The first dip, not the deepest peak of the autocorrelation,
    so a period's multiples do not win: an octave error counts 12 semitones in the spread the
    fit compares. A frame is voiced when it has such a dip and is not silence (within SILENCE
    of the loudest frame). Quiet frames count: phrase ends are quiet and low, and leaving them
    out put the test speakers' mean 1 semitone above pYIN's (``bench/probe_f0_tracker.py``).
    """
    x = np.asarray(audio16k, np.float64)
    lo, hi = int(16_000 / F0_RANGE_HZ[1]), int(16_000 / F0_RANGE_HZ[0]) + 1
    length = window + hi + 1
    if len(x) < length:
        return np.zeros(0)
    starts = hop * np.arange(1 + (len(x) - length) // hop)
    frames = x[starts[:, None] + np.arange(length)[None, :]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    n = 1 << int(np.ceil(np.log2(length + window)))
    # r(tau) = sum_j x_j x_{j+tau} over the window, for every lag at once
    r = np.fft.irfft(np.conj(np.fft.rfft(frames[:, :window], n)) * np.fft.rfft(frames, n), n)[:, : hi + 2]
    power = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames ** 2, axis=1)], axis=1)
    lags = np.arange(hi + 2)
    shifted = power[:, lags + window] - power[:, lags]  # sum of x_{j+tau}^2 over the window
    d = np.maximum(power[:, window:window + 1] + shifted - 2 * r, 0.0)
    d[:, 0] = 0.0
    running = np.cumsum(d[:, 1:], axis=1) / lags[1:]
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] / np.maximum(running, 1e-12)
    within = cmnd[:, lo:hi + 1]
    below = within < threshold
    first = np.where(below.any(axis=1), np.argmax(below, axis=1), np.argmin(within, axis=1))
    lag = lo + first
    for _ in range(hi - lo):  # from the first dip under the threshold down to its minimum
        down = (lag < hi) & (cmnd[np.arange(len(lag)), np.minimum(lag + 1, hi + 1)] < cmnd[np.arange(len(lag)), lag])
        if not down.any():
            break
        lag = lag + down
    rows = np.arange(len(lag))
    energy = power[:, window]
    voiced = (cmnd[rows, lag] < threshold) & (energy > SILENCE * energy.max())
    a, b, c = cmnd[rows, lag - 1], cmnd[rows, lag], cmnd[rows, np.minimum(lag + 1, hi + 1)]
    shift = 0.5 * (a - c) / np.where(np.abs(a - 2 * b + c) > 1e-12, a - 2 * b + c, 1.0)
    return 16_000 / (lag + np.clip(shift, -0.5, 0.5))[voiced]


def semitones(f0_hz: Any) -> Any:
    return 12 * np.log2(f0_hz) if isinstance(f0_hz, np.ndarray) else 12 * f0_hz.log2()


@dataclass(frozen=True)
class GradientResult:
    pack: np.ndarray  # (510, 256)
    pitch: float
    eq: np.ndarray  # (N_BANDS,) dB
    steps: int
    terms: dict[str, float]  # the objective's views at the last step


class GradientFit:
    """One voice's fit: ``step()`` until the budget is spent, then ``result()``."""

    def __init__(self, net: Any, encoder: Any, tokens: Sequence[list[int]], pack: np.ndarray, spread: np.ndarray,
                 target: np.ndarray, ref_bands: np.ndarray, reference: np.ndarray | None,
                 eq: np.ndarray | None = None, pitch: float = 1.0) -> None:
        import torch

        from voiced import encoder as ge2e

        self.torch, self.ge2e, self.net = torch, ge2e, net
        self.device = next(net.parameters()).device
        # the encoder's network on the fit's device, outside the encoder's lock (its own copy)
        self.model = copy.deepcopy(encoder._model).to(self.device).float().eval().requires_grad_(False)
        self.frontend = ge2e.MelFrontEnd(self.device)
        self.tokens = [list(t) for t in tokens]
        self.pack = np.asarray(pack, np.float32)
        self.spread = torch.tensor(np.asarray(spread, np.float32), device=self.device)
        self.target = torch.tensor(np.asarray(target, np.float32), device=self.device)
        self.band_hz = reference_bandwidth(ref_bands)
        in_band = post.BAND_EDGES[1:] <= self.band_hz
        self.ltas_bands = np.flatnonzero(in_band)
        ref_db = 10 * np.log10(np.maximum(np.asarray(ref_bands, np.float64), 1e-20))[self.ltas_bands]
        self.ref_ltas = torch.tensor(ref_db - ref_db.mean(), dtype=torch.float32, device=self.device)
        self.ref_mfcc: tuple[Any, Any] | None = None
        if reference is not None and WEIGHTS.get("mfcc", 0.0) > 0:  # the view weighs in: its filters, once
            self.mel_dct = self._mel_dct()
            with torch.no_grad():
                ceps = self._cepstra(torch.tensor(np.asarray(reference, np.float32), device=self.device))
                self.ref_mfcc = ceps.mean(1), ceps.std(1).clamp_min(1e-3)
        self.ref_f0: tuple[float, float] | None = None
        if reference is not None:
            st = semitones(f0_track(reference))
            if len(st) >= 20:
                self.ref_f0 = float(st.mean()), float(st.std())
        eq0 = np.zeros(post.N_BANDS, np.float32) if eq is None else np.asarray(eq, np.float32).copy()
        # what the reference cannot show stays as the model makes it: the voice stays wideband
        self.out_of_band = torch.tensor(post.BAND_CENTRES > self.band_hz, device=self.device)
        eq0[post.BAND_CENTRES > self.band_hz] = 0.0
        self.offset = torch.zeros(self.pack.shape[1], device=self.device, requires_grad=True)
        self.log_pitch = torch.tensor([float(np.log(pitch))], device=self.device, requires_grad=True)
        self.eq = torch.tensor(eq0, device=self.device, requires_grad=True)
        self.opt = torch.optim.Adam([{"params": [self.offset], "lr": LEARNING_RATES["offset"]},
                                     {"params": [self.log_pitch], "lr": LEARNING_RATES["log_pitch"]},
                                     {"params": [self.eq], "lr": LEARNING_RATES["eq"]}])
        self.steps = 0
        self.terms: dict[str, float] = {}
        self.rng = np.random.default_rng(SEED)
        self.queue: list[int] = []
        # decoder frames per second: the F0 curve runs at twice this rate
        self.frame_rate = post.SAMPLE_RATE / (2 * net.decoder.generator.scale)
        with torch.no_grad():  # the timing, once, from the starting voice
            self.durations = [self._durations(t) for t in self.tokens]

    # ------------------------------------------------------------------ the differentiable path

    def _style(self, tokens: list[int]) -> Any:
        row = self.torch.from_numpy(self.pack[min(len(tokens), self.pack.shape[0] - 1)]).to(self.device)
        return (row + self.offset * self.spread)[None]

    def _encode(self, tokens: list[int]) -> tuple[Any, Any, Any, Any]:
        """(ids, mask, style, the prosody predictor's token encoding) of one sentence."""
        torch, net = self.torch, self.net
        ids = torch.tensor([[0, *tokens, 0]], device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        style = self._style(tokens)
        d = net.predictor.text_encoder(net.bert_encoder(net.bert(ids, mask)), style[:, net.config.style:], mask, None)
        return ids, mask, style, d

    def _durations(self, tokens: list[int]) -> Any:
        """Frames per token as the model predicts them (the decoder, most of the cost, not run)."""
        d = self._encode(tokens)[3]
        return self.torch.round(self.net.predictor.durations(d, None)).clamp(min=1).long()[0]

    def _prosody(self, tokens: list[int], durations: Any) -> tuple[Any, Any, Any, Any]:
        """(the text aligned to frames, F0 curve, energy curve, the timbre half of the style) of
        one sentence with its timing held: KokoroNet.batch for one item, up to the decoder."""
        torch, net = self.torch, self.net
        c = net.config
        ids, mask, style, d = self._encode(tokens)
        owner = torch.repeat_interleave(torch.arange(ids.shape[1], device=self.device), durations)
        alignment = torch.nn.functional.one_hot(owner, ids.shape[1]).T[None].to(d.dtype)
        f0, energy = net.predictor.f0_energy(d.transpose(1, 2) @ alignment, style[:, c.style:])
        f0 = f0 * torch.exp(self.log_pitch)
        asr = net.text_encoder(ids, mask, None) @ alignment
        return asr, f0, energy, style[:, :c.style]

    def _crop(self, asr: Any, f0: Any, energy: Any, timbre: Any) -> Any:
        """24 kHz audio of a random window of CROP_S of one sentence (all of a shorter one).

        The decoder is most of the cost and its cost is the audio's length, so a step decodes
        windows, not sentences; a new window each step lets the fit hear every part over its
        steps. The window is decoded with CONTEXT_FRAMES either side, then cut, so its edges
        are not the decoder's edges.
        """
        frames = asr.shape[2]
        length = min(frames, max(1, round(CROP_S * self.frame_rate)))
        start = int(self.rng.integers(0, frames - length + 1))
        lo, hi = max(0, start - CONTEXT_FRAMES), min(frames, start + length + CONTEXT_FRAMES)
        (audio,) = self.net.decoder(asr[:, :, lo:hi], f0[:, 2 * lo:2 * hi], energy[:, 2 * lo:2 * hi], timbre)
        per_frame = audio.shape[0] // (hi - lo)
        return audio[(start - lo) * per_frame:(start - lo + length) * per_frame]

    def _heard(self, audio24: Any) -> Any:
        """EQ, low-pass to the reference's band and resample 24 -> 16 kHz, in one FFT."""
        torch = self.torch
        n = audio24.shape[0]
        freqs = np.fft.rfftfreq(n, 1 / post.SAMPLE_RATE)
        m = n * 2 // 3
        keep = freqs[: m // 2 + 1]
        gains = torch.tensor(post.eq_interpolation(keep), dtype=torch.float32, device=self.device) @ self.eq
        scale = 10 ** (gains / 20) * torch.tensor(keep <= self.band_hz, dtype=torch.float32, device=self.device)
        return torch.fft.irfft(torch.fft.rfft(audio24)[: m // 2 + 1] * scale, n=m) * (m / n)

    def _ltas(self, audio16: Any) -> Any:
        """Long-term spectrum (dB, level removed) over the louder 60% of frames, as post.band_powers."""
        torch = self.torch
        spec = torch.stft(audio16, 1024, 256, 1024, window=torch.hann_window(1024, device=self.device),
                          center=False, return_complex=True)
        power = spec.real ** 2 + spec.imag ** 2
        energy = power.sum(0).detach()
        ltas = power[:, energy >= torch.quantile(energy, 0.4)].mean(1)
        freqs = np.fft.rfftfreq(1024, 1 / 16_000)
        db = []
        for k in self.ltas_bands:
            sel = np.flatnonzero((freqs >= post.BAND_EDGES[k]) & (freqs < post.BAND_EDGES[k + 1]))
            db.append(10 * torch.log10(ltas[sel].mean() + 1e-12))
        out = torch.stack(db)
        return out - out.mean()

    def _mel_dct(self) -> tuple[Any, Any]:
        """The matrix from a 512-point power spectrum at 16 kHz to MFCC cepstra c1..c(MFCC-1),
        its mel bands spread from 100 Hz to the reference's bandwidth."""
        def mel(hz: Any) -> Any:
            return 2595 * np.log10(1 + np.asarray(hz) / 700)

        edges = 700 * (10 ** (np.linspace(mel(100.0), mel(self.band_hz), 42) / 2595) - 1)
        freqs = np.fft.rfftfreq(512, 1 / 16_000)
        lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
        bank = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
        k = np.arange(40)
        dct = np.cos(np.pi / 40 * (k[None, :] + 0.5) * np.arange(1, MFCC)[:, None]) * np.sqrt(2 / 40)
        torch = self.torch
        return (torch.tensor(dct, dtype=torch.float32, device=self.device),
                torch.tensor(bank, dtype=torch.float32, device=self.device))

    def _cepstra(self, audio16: Any) -> Any:
        """MFCC c1..c(MFCC-1) of the louder 60% of 32 ms frames, (MFCC-1, frames)."""
        torch = self.torch
        dct, bank = self.mel_dct
        spec = torch.stft(audio16, 512, 160, 512, window=torch.hann_window(512, device=self.device),
                          center=False, return_complex=True)
        power = spec.real ** 2 + spec.imag ** 2
        energy = power.sum(0).detach()
        loud = power[:, energy >= torch.quantile(energy, 0.4)]
        return dct @ torch.log(bank @ loud + 1e-10)

    def _mfcc_term(self, heard: Any) -> Any:
        """The window's cepstral means and spreads against the reference's, in the reference's
        spreads: the spectral envelope and how it moves, which a speaker carries in their voice."""
        mu, sd = self.ref_mfcc  # type: ignore[misc]
        ceps = self._cepstra(heard)
        return ((ceps.mean(1) - mu) / sd).square().mean() / 4 + (ceps.std(1) / sd).log().square().mean()

    def _ge2e(self, audio16: Any) -> Any:
        ge2e = self.ge2e
        rms = audio16.square().mean().sqrt().clamp_min(1e-9)
        wav = audio16 * (10 ** (ge2e.TARGET_DBFS / 20) / rms)
        e = self.model(ge2e.mel_partials(self.frontend, wav, ge2e.partial_starts(len(wav)))).mean(0)
        return e / e.norm().clamp_min(1e-12)

    # ------------------------------------------------------------------ the fit

    def _crop_terms(self, audio24: Any) -> dict[str, Any]:
        """The views of one decoded window: GE2E hears it with a little noise (a random level in
        NOISE_SNR_DB), so that what moves the encoder is the voice, not details under the noise."""
        torch = self.torch
        heard = self._heard(audio24)
        snr_db = float(self.rng.uniform(*NOISE_SNR_DB))
        noise = torch.from_numpy(self.rng.standard_normal(heard.shape[0]).astype(np.float32)).to(self.device)
        noisy = heard + noise * (heard.detach().square().mean().sqrt() * 10 ** (-snr_db / 20))
        terms = {"ge2e": 1 - self._ge2e(noisy) @ self.target,
                 "ltas": (self._ltas(heard) - self.ref_ltas).square().mean() / 100}
        if self.ref_mfcc is not None:
            terms["mfcc"] = self._mfcc_term(heard)
        return terms

    def _f0_term(self, curves: Sequence[Any]) -> Any | None:
        """Mean and spread of log F0 against the reference's, over the voiced frames of whole
        sentences (the predictor's curves: no decoding needed)."""
        if self.ref_f0 is None:
            return None
        voiced = self.torch.cat([f[0][(f[0] > F0_RANGE_HZ[0]) & (f[0] < F0_RANGE_HZ[1])] for f in curves])
        if len(voiced) < 2:
            return None
        st = semitones(voiced)
        return ((st.mean() - self.ref_f0[0]) ** 2 + (st.std() - self.ref_f0[1]) ** 2) / 4

    def _next_sentences(self) -> list[int]:
        """CROPS_PER_STEP of the fit sentences, each in turn: a new shuffle when all were heard."""
        while len(self.queue) < min(CROPS_PER_STEP, len(self.tokens)):
            self.queue.extend(int(i) for i in self.rng.permutation(len(self.tokens)) if i not in self.queue)
        chosen, self.queue = self.queue[:CROPS_PER_STEP], self.queue[CROPS_PER_STEP:]
        return chosen

    def _backward(self, terms: dict[str, Any], scale: float, totals: dict[str, float]) -> None:
        loss = sum(WEIGHTS[k] * v for k, v in terms.items()) * scale
        if not self.torch.isfinite(loss):
            raise FloatingPointError(f"the fit's objective is not finite: { {k: float(v) for k, v in terms.items()} }")
        # the sentences' prosody graphs are shared by the F0 view and every window: kept until the step ends
        loss.backward(retain_graph=True)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) * scale

    def step(self, should_stop: Callable[[], bool] | None = None) -> bool:
        """One Adam step over CROPS_PER_STEP windows of the fit sentences; False (nothing
        changed) if ``should_stop`` said so between windows.

        Each window's views are back-propagated as soon as they are known, so memory holds one
        window's decoder graph at a time.
        """
        self.opt.zero_grad()
        prosody = [self._prosody(self.tokens[i], self.durations[i]) for i in self._next_sentences()]
        totals: dict[str, float] = {}
        whole = {"prior": self.offset.square().mean()}
        f0 = self._f0_term([p[1] for p in prosody])
        if f0 is not None:
            whole["f0"] = f0
        self._backward(whole, 1.0, totals)
        for asr, f0_curve, energy, timbre in prosody:
            if should_stop is not None and should_stop():
                return False
            self._backward(self._crop_terms(self._crop(asr, f0_curve, energy, timbre)), 1 / len(prosody), totals)
        del prosody
        self.opt.step()
        torch = self.torch
        with torch.no_grad():
            self.eq.clamp_(post.MIN_GAIN_DB, post.MAX_GAIN_DB)
            self.eq[self.out_of_band] = 0.0  # interpolation leaks them a little gradient from in band
            self.log_pitch.clamp_(float(np.log(post.PITCH_RANGE[0])), float(np.log(post.PITCH_RANGE[1])))
        self.steps += 1
        self.terms = {k: round(v, 5) for k, v in totals.items()}
        return True

    def result(self) -> GradientResult:
        offset = (self.offset * self.spread).detach().cpu().numpy()
        return GradientResult((self.pack + offset[None]).astype(np.float32), float(np.exp(float(self.log_pitch.detach()))),
                              self.eq.detach().cpu().numpy().astype(np.float32), self.steps, dict(self.terms))


def give_back_heap() -> None:
    """Return freed heap to the system: glibc keeps what the fit's graphs used (3-4 GB on a CPU)
    in the process otherwise, long after the fit."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator is left to its own ways
        pass


def steps_for_budget(budget_s: float) -> int:
    return int(np.clip(round(budget_s / STEP_COST_S), 1, MAX_STEPS))


__all__ = ["GradientFit", "GradientResult", "STEP_COST_S", "f0_track", "give_back_heap", "reference_bandwidth", "steps_for_budget"]
