"""Probe: where one step of the gradient fit spends its time (gradfit.py), part by part.

    python bench/probe_gradfit_cost.py [--speaker allison] [--repeat 2]

Prints, per fit sentence, its length and the time of its text and prosody, of decoding a window
without a graph and with one, and of the window's views and backward; then the time of whole
``GradientFit.step()`` calls and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_kokoro import TESTDATA  # noqa: E402
from machine import describe  # noqa: E402
from voiced.audio import load_audio  # noqa: E402
from voiced.encoder import SpeakerEncoder  # noqa: E402
from voiced.engines.kokoro import KokoroEngine, gradfit, post  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/voiced-kokoro-bench")
    ap.add_argument("--speaker", default="allison")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(describe(), flush=True)
    ref = load_audio(TESTDATA / "voices" / f"{args.speaker}_a.wav", 16_000).samples
    ge2e = SpeakerEncoder(device="cpu")
    engine = KokoroEngine(args.cache, backend="torch", fit="gradient", encoder=ge2e)
    engine.load("cpu")
    fitter = engine.fitter()
    emb = ge2e.embed(ref)
    quick = engine.prepare_voice(ref, emb, stage="quick")
    start = engine.voicing(quick)
    fit = gradfit.GradientFit(engine.backend.net, ge2e, fitter.tokens + fitter.tuning_tokens[:gradfit.TUNING_SENTENCES],
                              quick["style"], fitter._spread, emb, post.band_powers(ref, 16_000), ref, start.eq, start.pitch)
    for _ in range(args.repeat):
        for i in range(len(fit.tokens)):
            t = time.perf_counter()
            prosody = fit._prosody(fit.tokens[i], fit.durations[i])
            t_pros = time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                fit._crop(*prosody)
            t_dec = time.perf_counter() - t
            t = time.perf_counter()
            audio = fit._crop(*prosody)
            t_fwd = time.perf_counter() - t
            t = time.perf_counter()
            sum(gradfit.WEIGHTS[k] * v for k, v in fit._crop_terms(audio).items()).backward()
            t_bwd = time.perf_counter() - t
            fit.opt.zero_grad()
            print(f"{len(fit.tokens[i]):3d} tokens, {int(fit.durations[i].sum()) / fit.frame_rate:5.2f} s, window "
                  f"{len(audio) / 24_000:4.2f} s: text and prosody {t_pros:.2f} decoder no-grad {t_dec:.2f} "
                  f"graph {t_fwd:.2f} views and backward {t_bwd:.2f}", flush=True)
    for _ in range(args.repeat):
        t = time.perf_counter()
        fit.step()
        print(f"step {time.perf_counter() - t:.1f} s {fit.terms}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"peak RSS {peak:.2f} GB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
