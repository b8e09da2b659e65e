"""Probe: the gradient fit (voiced/engines/kokoro/gradfit.py) under other weights and step counts,
judged by a model it never sees.

    python bench/probe_gradient_fit.py [--steps 16] [--speakers allison,carlo,june]
        [--weights ge2e=1,ltas=1,f0=1,prior=0.02] [--texts 7] [--eval-at 4,8]
        [--set CROP_S=1.5,CROPS_PER_STEP=4,NOISE_SNR_DB=25:40,lr.offset=0.08] [--wer]

Each speaker's quick voice is refined by ``StyleFitter.refine(method="gradient")`` with
``--steps`` steps, its objective's weights set by ``--weights`` (a view left out weighs 0) and
``--texts`` tuning sentences beside the calibration one. Printed: the quick voice and the fitted
one (and the fit cut at each ``--eval-at`` step count) on the five held-out sentences at the
references' bandwidth, on the held-out judge and on GE2E (identity 0-1 and own minus nearest
other, see bench_identity.py); with ``--wer``, Whisper base's WER on 15 held-out sentences.
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
from voiced.encoder import SpeakerEncoder  # noqa: E402
from voiced.engines.base import Conditioning  # noqa: E402
from voiced.engines.kokoro import KokoroEngine, gradfit  # noqa: E402
from voiced.engines.kokoro.post import resample_24k_to_16k  # noqa: E402

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
            cond = fitter.refine(emb, previous=quick, reference=ref, method="gradient", max_evals=n)
            terms = " ".join(f"{k} {v:.4f}" for k, v in cond.meta["objective"].items())
            report(speaker, f"gradient {n} steps", cond, f" ({time.perf_counter() - t0:.0f} s; {terms}; "
                                                         f"pitch {engine.voicing(cond).pitch:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
