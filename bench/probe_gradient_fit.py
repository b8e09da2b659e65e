"""Probe: fit a voice by gradient through the torch Kokoro network, judged by a model it never sees.

    python bench/probe_gradient_fit.py [--steps 24] [--speakers allison,carlo,june] [--weights ge2e=1,ltas=1,f0=1,prior=0.02]

Starts from the quick voice (the blend the base voices' embeddings predict, with its EQ). The
durations are those of a forward pass of the quick voice, held fixed. Optimised with Adam: an
offset of the whole style (both halves; in units of the base styles' per-dimension spread), the
pitch factor and the EQ gains. The fit's text is the fitter's own calibration and tuning
sentences; its speech is taken to 16 kHz and the references' band (3.8 kHz) before any view:

- ``ge2e``: 1 - GE2E cosine to the reference's embedding (the joined sentences as one utterance);
- ``ltas``: the long-term spectrum's shape against the reference's, in 20 bands up to 3.8 kHz
  (dB, level removed), mean squared / 100;
- ``f0``: the network's log-F0 mean and spread on voiced frames against the reference's (pYIN),
  in semitones, squared / 4;
- ``prior``: mean squared style offset (a guard against leaving the base styles' region).

Printed per speaker: quick and the gradient-fitted voice on the five held-out sentences, at the
references' bandwidth, on the held-out judge and on GE2E (identity 0-1 and own-minus-nearest-other,
see bench_identity.py), with the fit's time and steps; with ``--wer``, Whisper base's WER on 15
held-out sentences (wideband).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_identity import SPEAKERS, Panel  # noqa: E402
from bench_kokoro import SIM_TEXTS, TESTDATA, WER_TEXTS  # noqa: E402
from judges import HeldOutJudge, Whisper, band_limit, word_errors  # noqa: E402
from machine import describe  # noqa: E402
from voiced.audio import load_audio  # noqa: E402
from voiced.encoder import TARGET_DBFS, SpeakerEncoder, mel_partials, partial_starts  # noqa: E402
from voiced.engines.base import Conditioning  # noqa: E402
from voiced.engines.kokoro import KokoroEngine, post  # noqa: E402
from voiced.engines.kokoro.fitting import CALIBRATION_TEXTS, TUNING_TEXTS, resample_24k_to_16k  # noqa: E402

import torch  # noqa: E402

BAND_HZ = 3800.0
LTAS_EDGES = np.geomspace(150.0, BAND_HZ, 17)


def _interp_matrix(freqs: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(len(freqs), len(centres)) weights of linear interpolation in log frequency, ends held."""
    x = np.log(np.maximum(freqs, 1.0))
    xp = np.log(centres)
    m = np.zeros((len(freqs), len(centres)))
    for i, v in enumerate(x):
        if v <= xp[0]:
            m[i, 0] = 1.0
        elif v >= xp[-1]:
            m[i, -1] = 1.0
        else:
            j = int(np.searchsorted(xp, v)) - 1
            t = (v - xp[j]) / (xp[j + 1] - xp[j])
            m[i, j], m[i, j + 1] = 1 - t, t
    return m


def to_band16k(audio24: torch.Tensor, eq_db: torch.Tensor | None) -> torch.Tensor:
    """EQ (zero-phase, the band gains interpolated as post.eq_filter does), low-pass to BAND_HZ
    and resample 24 -> 16 kHz, all in one FFT: differentiable in the audio and the gains."""
    n = audio24.shape[0]
    spec = torch.fft.rfft(audio24)
    freqs = np.fft.rfftfreq(n, 1 / post.SAMPLE_RATE)
    if eq_db is not None:
        m = torch.from_numpy(_interp_matrix(freqs, post.BAND_CENTRES)).float()
        spec = spec * 10 ** ((m @ eq_db) / 20)
    m16 = n * 2 // 3
    keep = torch.from_numpy((freqs[: m16 // 2 + 1] <= BAND_HZ).astype(np.float32))
    return torch.fft.irfft(spec[: m16 // 2 + 1] * keep, n=m16) * (m16 / n)


def band_db(audio16: torch.Tensor) -> torch.Tensor:
    """Long-term power per LTAS band in dB over the louder 60% of 64 ms frames."""
    spec = torch.stft(audio16, 1024, 256, 1024, window=torch.hann_window(1024), return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2  # (513, frames)
    energy = power.sum(0).detach()
    keep = energy >= torch.quantile(energy, 0.4)
    ltas = power[:, keep].mean(1)
    freqs = np.fft.rfftfreq(1024, 1 / 16_000)
    rows = [torch.from_numpy((freqs >= lo) & (freqs < hi)) for lo, hi in zip(LTAS_EDGES[:-1], LTAS_EDGES[1:])]
    return torch.stack([10 * torch.log10(ltas[r].mean() + 1e-10) for r in rows])


def reference_f0(ref16: np.ndarray) -> tuple[float, float]:
    """Mean and spread of log2-F0 (in semitones) of the reference's voiced frames, by pYIN."""
    import librosa

    f0, voiced, _ = librosa.pyin(ref16, fmin=60, fmax=500, sr=16_000, frame_length=1024)
    st = 12 * np.log2(f0[voiced & np.isfinite(f0)])
    return float(st.mean()), float(st.std())


class GradientFit:
    def __init__(self, engine: KokoroEngine, encoder: SpeakerEncoder, ref16: np.ndarray, target: np.ndarray,
                 start: Conditioning, weights: dict[str, float], n_texts: int = 6) -> None:
        self.net = engine.backend.net
        self.encoder, self.weights = encoder, weights
        self.target = torch.from_numpy(np.asarray(target, np.float32))
        self.pack = np.asarray(start["style"], np.float32)
        packs = np.stack([engine.voices[n] for n in sorted(engine.voices)]).reshape(-1, 256)
        self.scale = torch.from_numpy(packs.std(axis=0).astype(np.float32))
        self.texts = [engine.tokens(ps) for t in (*CALIBRATION_TEXTS, *TUNING_TEXTS)[:n_texts]
                      for ps in engine.phonemize(t, "en-us")]
        eq0 = np.asarray(start["eq"], np.float32) if "eq" in start else np.zeros(post.N_BANDS, np.float32)
        self.offset = torch.zeros(256, requires_grad=True)
        self.log_pitch = torch.zeros(1, requires_grad=True)
        self.eq = torch.tensor(eq0, requires_grad=True)
        self.opt = torch.optim.Adam([{"params": [self.offset], "lr": 0.08}, {"params": [self.log_pitch], "lr": 0.01},
                                     {"params": [self.eq], "lr": 0.4}])
        ref_band = torch.from_numpy(band_limit(ref16, 16_000, BAND_HZ))
        self.ref_ltas = band_db(ref_band)
        self.ref_f0 = reference_f0(ref16)
        print(f"  reference log-F0 {self.ref_f0[0]:.1f} +- {self.ref_f0[1]:.1f} semitones", flush=True)
        with torch.no_grad():  # the timing, once, from the starting voice
            self.durations = [self._run(tokens, durations=None)[2] for tokens in self.texts]

    def _style(self, tokens: list[int]) -> torch.Tensor:
        row = torch.from_numpy(self.pack[min(len(tokens), self.pack.shape[0] - 1)])
        return (row + self.offset * self.scale)[None]

    def _run(self, tokens: list[int], durations: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(audio 24 kHz, F0 curve, durations) of one sentence, as KokoroNet.batch for one item."""
        net, c = self.net, self.net.config
        ids = torch.tensor([[0, *tokens, 0]])
        mask = torch.ones_like(ids, dtype=torch.bool)
        style = self._style(tokens)
        s_prosody, s_timbre = style[:, c.style:], style[:, :c.style]
        d = net.predictor.text_encoder(net.bert_encoder(net.bert(ids, mask)), s_prosody, mask, None)
        if durations is None:
            durations = torch.round(net.predictor.durations(d, None)).clamp(min=1).long()[0]
        owner = torch.repeat_interleave(torch.arange(ids.shape[1]), durations)
        alignment = torch.nn.functional.one_hot(owner, ids.shape[1]).T[None].float()
        f0, n = net.predictor.f0_energy(d.transpose(1, 2) @ alignment, s_prosody)
        f0 = f0 * torch.exp(self.log_pitch)
        asr = net.text_encoder(ids, mask, None) @ alignment
        (audio,) = net.decoder(asr, f0, n, s_timbre)
        return audio, f0[0], durations

    def _ge2e(self, audio16: torch.Tensor) -> torch.Tensor:
        rms = torch.sqrt(torch.mean(audio16 ** 2) + 1e-12)
        wav = audio16 * (10 ** (TARGET_DBFS / 20) / rms)
        parts = mel_partials(self.encoder._frontend, wav, partial_starts(len(wav)))
        e = self.encoder._model(parts).mean(0)
        return e / e.norm()

    def step(self) -> dict[str, float]:
        self.opt.zero_grad()
        gap = torch.zeros(4000)
        pieces, f0s = [], []
        for tokens, dur in zip(self.texts, self.durations):
            audio, f0, _ = self._run(tokens, dur)
            pieces += [to_band16k(audio, self.eq), gap]
            f0s.append(f0[f0 > 50])  # voiced frames; the edges of voicing ramp through low values
        speech = torch.cat(pieces)
        terms: dict[str, torch.Tensor] = {}
        w = self.weights
        if w.get("ge2e"):
            terms["ge2e"] = 1 - self._ge2e(speech) @ self.target
        if w.get("ltas"):
            diff = band_db(speech) - self.ref_ltas
            terms["ltas"] = ((diff - diff.mean()) ** 2).mean() / 100
        if w.get("f0"):
            st = 12 * torch.log2(torch.cat(f0s))
            self.f0_now = (float(st.mean().detach()), float(st.std().detach()))
            terms["f0"] = ((st.mean() - self.ref_f0[0]) ** 2 + (st.std() - self.ref_f0[1]) ** 2) / 4
        if w.get("prior"):
            terms["prior"] = (self.offset ** 2).mean()
        loss = sum(w[k] * v for k, v in terms.items())
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.eq.clamp_(post.MIN_GAIN_DB, post.MAX_GAIN_DB)
            self.log_pitch.clamp_(float(np.log(post.PITCH_RANGE[0])), float(np.log(post.PITCH_RANGE[1])))
        return {k: float(v) for k, v in terms.items()}

    def conditioning(self) -> Conditioning:
        pack = self.pack + (self.offset * self.scale).detach().numpy()[None]
        arrays = {"style": pack.astype(np.float32), "warp": np.array([1.0], np.float32),
                  "pitch": np.exp(self.log_pitch.detach().numpy()).astype(np.float32),
                  "eq": self.eq.detach().numpy().astype(np.float32)}
        return Conditioning(arrays, {"engine": "kokoro", "stage": "refined", "fit": "gradient-probe"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "voiced-kokoro-bench"))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--speakers", default=",".join(SPEAKERS))
    ap.add_argument("--weights", default="ge2e=1,ltas=1,f0=1,prior=0.02")
    ap.add_argument("--texts", type=int, default=6, help="how many of the fit's sentences to fit on")
    ap.add_argument("--wer", action="store_true")
    args = ap.parse_args()
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    print(describe(), flush=True)
    print(f"weights {weights}, {args.steps} steps", flush=True)
    torch.manual_seed(0)
    clips = {p.name.rsplit(".", 1)[0]: load_audio(p, 16_000).samples
             for p in sorted((TESTDATA / "voices").iterdir()) if p.suffix in (".wav", ".flac", ".ogg")}
    ge2e = SpeakerEncoder(device="cpu")
    judge = HeldOutJudge()
    panels = [Panel("judge", judge.embed, clips), Panel("GE2E", ge2e.embed, clips)]
    whisper = Whisper() if args.wer else None
    engine = KokoroEngine(args.cache, backend="torch")
    engine.load("cpu")
    engine._encoder = ge2e
    engine.fitter()

    def report(speaker: str, label: str, cond: Conditioning, extra: str = "") -> None:
        gap = np.zeros(int(0.25 * engine.sample_rate), np.float32)
        speech = np.concatenate([x for t in SIM_TEXTS for x in (engine.synthesize_all(t, cond), gap)])
        audio = band_limit(resample_24k_to_16k(speech), 16_000)
        figs = []
        for p in panels:
            e = p.embed(audio)
            figs.append(f"{p.name} identity {p.identity(speaker, e):+.2f} own-other {p.margin(speaker, e):+.3f}")
        if whisper is not None:
            errs = [word_errors(t, whisper.transcribe(resample_24k_to_16k(engine.synthesize_all(t, cond)))) for t in WER_TEXTS]
            figs.append(f"WER {sum(e for e, _ in errs) / sum(n for _, n in errs):.1%}")
        print(f"{speaker} {label}{extra}: " + "; ".join(figs), flush=True)

    for speaker in args.speakers.split(","):
        ref = clips[f"{speaker}_a"]
        emb = ge2e.embed(ref)
        quick = engine.prepare_voice(ref, emb, stage="quick")
        report(speaker, "quick", quick)
        t0 = time.perf_counter()
        fit = GradientFit(engine, ge2e, ref, emb, quick, weights, args.texts)
        for i in range(args.steps):
            terms = fit.step()
            if i % 4 == 0 or i == args.steps - 1:
                print(f"  step {i}: " + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                      + f" F0 {getattr(fit, 'f0_now', (0, 0))[0]:.1f}+-{getattr(fit, 'f0_now', (0, 0))[1]:.1f}"
                      + f" pitch {float(torch.exp(fit.log_pitch)):.3f} |offset| {float(fit.offset.norm()):.2f}", flush=True)
        report(speaker, "gradient", fit.conditioning(), f" ({time.perf_counter() - t0:.0f} s, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
