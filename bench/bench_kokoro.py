"""Kokoro engine benchmark: RTF vs a bare onnxruntime call, time to first chunk, RSS, cloning.

    python bench/bench_kokoro.py [--cache DIR] [--threads N] [--fit-budget 60] [--no-fit]

Prints one line per figure. Cloning similarities (GE2E cosine to the reference embedding) are
measured on held-out text, not the calibration text the fitter optimises on. Intelligibility is
the word error rate of pocketsphinx (bench-only dependency: ``pip install pocketsphinx``; skipped
when missing) on three held-out sentences, for the best stock voice, quick and refined; the
target is refined WER within 1.25x of the stock voice's.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
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
# Intelligibility: word error rate of pocketsphinx (en-US model shipped in its wheel) on these
# held-out sentences (HELD_OUT first, so the similarity figure's text is among them).
WER_TEXTS = (
    HELD_OUT,
    "Please remember to close the window before you leave the house tonight.",
    "The children played in the park until the sun went down behind the hills.",
)
TESTDATA = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).resolve().parents[1].parent / "shared" / "testdata")


def _best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _words(text: str) -> list[str]:
    """Lower case, punctuation dropped (apostrophes kept inside words), split on whitespace."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).replace(" '", " ").split()


def wer(ref: str, hyp: str) -> tuple[int, int]:
    """(word-level edit distance, reference word count) after normalising case and punctuation."""
    r, h = _words(ref), _words(hyp)
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


class Recogniser:
    """pocketsphinx (default en-US acoustic + language model), 16 kHz mono int16 in, text out."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=16000, loglevel="FATAL")

    def __call__(self, audio16k: np.ndarray) -> str:
        pcm = (np.clip(audio16k, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


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
    from voiced.engines.kokoro.fitting import resample_24k_to_16k

    try:
        import pocketsphinx

        recognise: Recogniser | None = Recogniser()
        print(f"WER by pocketsphinx {getattr(pocketsphinx, '__version__', None) or _dist_version('pocketsphinx')} "
              f"on {len(WER_TEXTS)} held-out sentences ({sum(len(_words(t)) for t in WER_TEXTS)} words)")
    except ImportError:
        recognise = None
        print("WER skipped: pip install pocketsphinx")

    def wer_of(cond) -> float:
        errs = words = 0
        for text in WER_TEXTS:
            e, n = wer(text, recognise(resample_24k_to_16k(engine.synthesize_all(text, cond))))
            errs, words = errs + e, words + n
        return errs / words

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
        sims, wers = {}, {}
        for label, cond in (("stock", engine.base_conditioning(quick.meta["stock_best"])), ("quick", quick), ("refined", refined)):
            out = engine.synthesize_all(HELD_OUT, cond)
            sims[label] = cosine(fitter.embed_audio(out), emb)
            if recognise is not None:
                wers[label] = wer_of(cond)
        print(f"{name}: stock({quick.meta['stock_best']}) {sims['stock']:.3f}  quick {sims['quick']:.3f} ({t_quick:.1f} s)  "
              f"refined {sims['refined']:.3f} ({t_ref:.0f} s, {refined.meta['evaluations']} evals)  "
              f"gain {sims['refined'] - sims['stock']:+.3f}")
        if wers:
            ratio = wers["refined"] / wers["stock"] if wers["stock"] > 0 else float("inf") if wers["refined"] > 0 else 1.0
            print(f"{name}: WER stock {wers['stock']:.1%}  quick {wers['quick']:.1%}  refined {wers['refined']:.1%}  "
                  f"refined/stock {ratio:.2f} ({'within' if ratio <= 1.25 else 'OVER'} the 1.25x limit)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
