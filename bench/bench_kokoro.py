"""Kokoro engine benchmark: RTF vs a bare onnxruntime call, time to first chunk, RSS, cloning.

    python bench/bench_kokoro.py [--cache DIR] [--threads N] [--fit-budget 60] [--no-fit]

Prints one line per figure. Cloning similarities (GE2E cosine to the reference embedding) are
measured on held-out text, not the calibration text the fitter optimises on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voiced.engines.kokoro import KokoroEngine  # noqa: E402
from voiced.engines.kokoro.engine import MAX_TOKENS  # noqa: E402

RTF_TEXT = ("The old lighthouse keeper climbed the stairs every evening, lit the great lamp, "
            "and watched the ships pass safely through the narrow channel below.")
THREE = "Good morning. The weather today is mild and dry, with light winds from the west. Have a nice day!"
HELD_OUT = "I went to the market yesterday and bought some fresh bread and a few apples."
TESTDATA = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).resolve().parents[1].parent / "shared" / "testdata")


def _best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "voiced-kokoro-bench"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fit-budget", type=float, default=60.0)
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument("--speakers", default="allison_a.wav,carlo_a.wav,june_a.wav")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import psutil

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    engine = KokoroEngine(args.cache, threads=args.threads)
    t0 = time.perf_counter()
    engine.load(args.device)
    print(f"load+warm-up: {time.perf_counter() - t0:.2f} s on {engine.device}; "
          f"RSS after load {proc.memory_info().rss / 2**20:.0f} MiB (+{(proc.memory_info().rss - rss0) / 2**20:.0f})")

    voice = engine.default_conditioning()
    (ps,) = engine.phonemize(RTF_TEXT)
    tokens = engine.tokens(ps)[:MAX_TOKENS]
    style = engine.style_pack(voice)[len(tokens)].reshape(1, 256)
    feeds = {"tokens": np.asarray([[0, *tokens, 0]], np.int64), "style": style, "speed": np.ones(1, np.float32)}
    audio = engine.synthesize_all(RTF_TEXT, voice)
    dur = len(audio) / engine.sample_rate
    t_bare = _best_of(lambda: engine._session.run(None, feeds))
    t_eng = _best_of(lambda: engine.synthesize_all(RTF_TEXT, voice))
    print(f"RTF ({dur:.1f} s audio, {len(tokens)} tokens): engine {t_eng / dur:.3f}, bare onnxruntime {t_bare / dur:.3f} "
          f"(front end + overhead {1000 * (t_eng - t_bare):.0f} ms)")

    def first_chunk() -> None:
        next(iter(engine.synthesize(THREE, voice, {})))

    ttfc = _best_of(first_chunk)
    total = _best_of(lambda: list(engine.synthesize(THREE, voice, {})))
    print(f"three sentences: first chunk after {1000 * ttfc:.0f} ms, all after {1000 * total:.0f} ms")
    print(f"RSS: {proc.memory_info().rss / 2**20:.0f} MiB")

    if args.no_fit:
        return 0
    try:
        import soundfile as sf

        from voiced.encoder import SpeakerEncoder, cosine
    except ImportError as exc:
        print(f"cloning skipped: {exc}")
        return 0
    engine._encoder = SpeakerEncoder(device="cpu")
    t0 = time.perf_counter()
    fitter = engine.fitter()
    print(f"fitter ready in {time.perf_counter() - t0:.1f} s")
    for name in args.speakers.split(","):
        wav, sr = sf.read(TESTDATA / "voices" / name, dtype="float32")
        emb = engine.encoder.embed(wav)
        t0 = time.perf_counter()
        quick = engine.prepare_voice(wav, emb, stage="quick")
        t_quick = time.perf_counter() - t0
        t0 = time.perf_counter()
        refined = engine.prepare_voice(wav, emb, stage="refined", budget_s=args.fit_budget, previous=quick)
        t_ref = time.perf_counter() - t0
        sims = {}
        for label, cond in (("stock", engine.base_conditioning(quick.meta["stock_best"])), ("quick", quick), ("refined", refined)):
            out = engine.synthesize_all(HELD_OUT, cond)
            sims[label] = cosine(fitter.embed_audio(out), emb)
        print(f"{name}: stock({quick.meta['stock_best']}) {sims['stock']:.3f}  quick {sims['quick']:.3f} ({t_quick:.1f} s)  "
              f"refined {sims['refined']:.3f} ({t_ref:.0f} s, {refined.meta['evaluations']} evals)  "
              f"gain {sims['refined'] - sims['stock']:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
