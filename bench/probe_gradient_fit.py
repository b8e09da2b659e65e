"""Probe: the gradient fit (voiced/engines/kokoro/gradfit.py) under other weights and step counts,
judged by a model it never sees.

    python bench/probe_gradient_fit.py [--steps 16] [--speakers allison,carlo,june]
        [--weights ge2e=1,ltas=1,f0=1,prior=0.02] [--texts 7] [--eval-at 4,8]
        [--set CROP_S=1.5,CROPS_PER_STEP=4,NOISE_SNR_DB=25:40,lr.offset=0.08] [--wer] [--oracle 1]

Each speaker's quick voice is refined by ``StyleFitter.refine(method="gradient")`` with
``--steps`` steps, its objective's weights set by ``--weights`` (a view left out weighs 0) and
``--texts`` tuning sentences beside the calibration one. Printed: the quick voice and the fitted
one (and the fit cut at each ``--eval-at`` step count) on the five held-out sentences at the
references' bandwidth, on the held-out judge and on GE2E (identity 0-1 and own minus nearest
other, see bench_identity.py); with ``--wer``, Whisper base's WER on 15 held-out sentences.

``--oracle W`` is a ceiling, never a fit to ship: it adds the held-out judge itself to the
objective (weight W; its cosine to the reference recording's embedding, on every window), so the
fit may learn that judge. What the judge then says on held-out sentences and the speaker's second
recording is about as high as this voice space (the base styles, an offset, pitch and EQ) goes
on it; GE2E beside it shows whether the oracle's gains carry over to another speaker model.
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
import judges  # noqa: E402
from judges import HeldOutJudge, Whisper, band_limit, word_errors  # noqa: E402
from machine import describe  # noqa: E402
from voiced.audio import load_audio  # noqa: E402
from voiced.encoder import SpeakerEncoder  # noqa: E402
from voiced.engines.base import Conditioning  # noqa: E402
from voiced.engines.kokoro import KokoroEngine, gradfit  # noqa: E402
from voiced.engines.kokoro.post import resample_24k_to_16k  # noqa: E402

def add_oracle(judge: HeldOutJudge, weight: float) -> None:
    """Put the held-out judge into every window's views as ``oracle`` (see the docstring)."""
    import torch

    bank = torch.tensor(judges._judge_filterbank(), dtype=torch.float32)
    dct = torch.tensor(judges._judge_dct(), dtype=torch.float32)
    model = judge.model.requires_grad_(False)

    def embed(audio16: torch.Tensor) -> torch.Tensor:  # judges.judge_features + the network, differentiable
        n = judges._JUDGE_FFT
        spec = torch.stft(audio16, n, judges._JUDGE_HOP, n, window=torch.hamming_window(n), center=True,
                          pad_mode="constant", return_complex=True)
        db = 10 * torch.log10((spec.real ** 2 + spec.imag ** 2).T @ bank + 1e-10)
        db = torch.maximum(db, db.max().detach() - 80.0)
        e = model.extract((db @ dct)[None, None]).reshape(-1)
        return e / e.norm().clamp_min(1e-12)

    crop_terms, init = gradfit.GradientFit._crop_terms, gradfit.GradientFit.__init__

    def patched_init(self: gradfit.GradientFit, *a: object, **kw: object) -> None:
        init(self, *a, **kw)
        reference = a[7] if len(a) > 7 else kw["reference"]  # GradientFit's eighth argument
        self.oracle_target = torch.tensor(judge.embed(np.asarray(reference)), dtype=torch.float32)

    def patched_terms(self: gradfit.GradientFit, audio24: torch.Tensor) -> dict:
        terms = crop_terms(self, audio24)
        terms["oracle"] = 1 - embed(self._heard(audio24)) @ self.oracle_target
        return terms

    gradfit.GradientFit.__init__, gradfit.GradientFit._crop_terms = patched_init, patched_terms
    gradfit.WEIGHTS["oracle"] = weight


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "voiced-kokoro-bench"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-at", default="", help="also judge the fit cut at these step counts (each a fit of its own)")
    ap.add_argument("--speakers", default=",".join(SPEAKERS))
    ap.add_argument("--weights", default=",".join(f"{k}={v:g}" for k, v in gradfit.WEIGHTS.items()))
    ap.add_argument("--texts", type=int, default=gradfit.TUNING_SENTENCES, help="tuning sentences beside the calibration one")
    ap.add_argument("--set", default="", help="gradfit constants and learning rates, e.g. CROP_S=1.5,lr.offset=0.12")
    ap.add_argument("--wer", action="store_true")
    ap.add_argument("--oracle", type=float, default=0.0, help="a ceiling: the held-out judge in the objective, this weight")
    args = ap.parse_args()
    for name, value in (kv.split("=") for kv in args.set.split(",") if kv):
        if name.startswith("lr."):
            gradfit.LEARNING_RATES[name[3:]] = float(value)
        elif isinstance(getattr(gradfit, name), tuple):
            setattr(gradfit, name, tuple(float(v) for v in value.split(":")))
        else:
            setattr(gradfit, name, type(getattr(gradfit, name))(float(value)))
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    gradfit.WEIGHTS.update({k: weights.get(k, 0.0) for k in gradfit.WEIGHTS})
    gradfit.TUNING_SENTENCES = args.texts
    counts = sorted({*(int(n) for n in args.eval_at.split(",") if n), args.steps})
    print(describe(), flush=True)
    print(f"weights {gradfit.WEIGHTS}, {args.texts} tuning sentences, judged after {counts} steps; "
          f"{gradfit.CROPS_PER_STEP} windows of {gradfit.CROP_S} s a step, learning rates {gradfit.LEARNING_RATES}", flush=True)
    clips = {p.name.rsplit(".", 1)[0]: load_audio(p, 16_000).samples
             for p in sorted((TESTDATA / "voices").iterdir()) if p.suffix in (".wav", ".flac", ".ogg")}
    ge2e = SpeakerEncoder(device="cpu")
    judge = HeldOutJudge()
    panels = [Panel("judge", judge.embed, clips), Panel("GE2E", ge2e.embed, clips)]
    if args.oracle:
        add_oracle(judge, args.oracle)
        print(f"ORACLE: the held-out judge is in the objective at weight {args.oracle}: a ceiling, not a result", flush=True)
    whisper = Whisper() if args.wer else None
    engine = KokoroEngine(args.cache, backend="torch", fit="gradient", encoder=ge2e)
    engine.load("cpu")
    fitter = engine.fitter()

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
        for n in counts:
            t0 = time.perf_counter()
            # a budget far beyond the steps: the fit is never cut short by the machine's speed
            cond = fitter.refine(emb, previous=quick, reference=ref, method="gradient", max_evals=n, budget_s=3600)
            terms = " ".join(f"{k} {v:.4f}" for k, v in cond.meta["objective"].items())
            report(speaker, f"gradient {n} steps", cond, f" ({time.perf_counter() - t0:.0f} s; {terms}; "
                                                         f"pitch {engine.voicing(cond).pitch:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
