"""Kokoro engine benchmark: RTF vs a bare onnxruntime call, time to first chunk, RSS, cloning.

    python bench/bench_kokoro.py [--cache DIR] [--threads N] [--fit-budget 60] [--no-fit] [--wer-speeds] [--tradeoff] [--base-voices]

Prints one line per figure. Cloning similarities (GE2E cosine to the reference embedding, mean
over five held-out sentences, not the calibration text the fitter optimises on) are given for the
best stock voice on that text (every base voice is tried), quick and refined; the targets are
refined >= 0.80 and >= +0.15 over that stock voice. Intelligibility is the word error rate of
pocketsphinx (bench-only dependency: ``pip install pocketsphinx``; skipped when missing) on the
same outputs and ten more held-out sentences; the target is refined WER within 1.25x of the best stock voice's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from judges import word_errors as wer  # noqa: E402
from judges import words as _words  # noqa: E402
from machine import describe  # noqa: E402
from voiced.engines.base import Conditioning  # noqa: E402
from voiced.engines.kokoro import KokoroEngine  # noqa: E402
from voiced.engines.kokoro.engine import IDLE_RELEASE_S, MAX_TOKENS  # noqa: E402
from voiced.engines.kokoro.fitting import StyleFitter  # noqa: E402
from voiced.engines.kokoro.post import resample_24k_to_16k  # noqa: E402

RTF_TEXT = ("The old lighthouse keeper climbed the stairs every evening, lit the great lamp, "
            "and watched the ships pass safely through the narrow channel below.")
THREE = "Good morning. The weather today is mild and dry, with light winds from the west. Have a nice day!"
HELD_OUT = "I went to the market yesterday and bought some fresh bread and a few apples."
# Similarity: mean over these held-out sentences (none is in the fitter's calibration or tuning text).
SIM_TEXTS = (
    HELD_OUT,
    "Please remember to close the window before you leave the house tonight.",
    "The children played in the park until the sun went down behind the hills.",
    "My brother says the new library downtown opens early on Saturday mornings.",
    "We should probably leave soon if we want to catch the last train home.",
)
# Intelligibility: word error rate of pocketsphinx (en-US model shipped in its wheel) on the same
# outputs, and on ten more held-out sentences: on the five alone (67 words) one word moves the
# figure by 1.5 points, and a stock voice's count moves by a few words when its speed changes by
# 1-3%, too coarse for a 1.25x limit.
WER_TEXTS = (
    *SIM_TEXTS,
    "The doctor said I should drink more water and get some sleep.",
    "Our flight was delayed for two hours because of the storm.",
    "Can you tell me where the nearest bus station is?",
    "She opened the letter and smiled when she read the news.",
    "The meeting will start at nine in the small room upstairs.",
    "He forgot his keys at work and had to wait outside in the rain.",
    "I would like a cup of coffee with milk and no sugar, please.",
    "The teacher asked the students to read the first chapter at home.",
    "They are building a new bridge across the river next year.",
    "It is important to check the tires before a long drive.",
)
# --base-voices: each base voice's word error rate on these, sentences neither the fit nor the
# figures above use. The base voices are Japanese speakers, and how well their English is
# understood sets the bar a refined voice is held to: its best stock voice's WER.
BASE_VOICE_TEXTS = (
    "The river was cold, so we waited on the bank until noon.",
    "Could you send me the report by Friday afternoon?",
    "A group of students walked quietly past the museum gate.",
    "He painted the fence white and then fixed the broken gate.",
    "Dinner will be ready in about twenty minutes.",
    "The old radio still works if you turn it on slowly.",
    "We found a small cafe near the station with good soup.",
    "Please write your name at the top of every page.",
    "The wind blew the papers off the table and onto the floor.",
    "My sister moved to a farm with two horses and a goat.",
    "They watched the game on a big screen at the hotel.",
    "The baker opens his shop at six every morning.",
    "It started to snow just as we reached the top of the hill.",
    "You can borrow my bicycle if you bring it back tonight.",
    "The nurse checked his temperature twice during the night.",
    "Most of the apples on that tree are still green.",
    "I left my umbrella on the bus this morning.",
    "The store around the corner sells fresh flowers and cheese.",
    "Her phone rang three times before she answered it.",
    "We need more chairs for the party on Sunday.",
)
# Speaking rates for --wer-speeds: a 1-3% change moves a voice's count on the five sentences by a
# few words, so a mean over these says more than the count at 1.0 alone.
JITTER_SPEEDS = (0.97, 0.98, 0.99, 1.0, 1.01, 1.02, 1.03)
# --tradeoff: voices part of the way from the refined voice (0) to its best stock voice (1), to
# see whether likeness can be traded for intelligibility on the held-out sentences.
TRADEOFF_STEPS = (0.2, 0.4, 0.6, 0.8)
TESTDATA = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).resolve().parents[1].parent / "shared" / "testdata")


def _best_of(fn, n: int = 3) -> float:
    return _best_of_each([fn], n)[0]


def _best_of_each(fns, n: int) -> list[float]:
    """Fastest of ``n`` runs of each function, the runs interleaved so that drift in the machine's
    speed (clock, neighbours) during the measurement weighs on each alike."""
    times = [[] for _ in fns]
    for _ in range(n):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


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


def toward(cond: Conditioning, stock: Conditioning, alpha: float) -> Conditioning:
    """The voice a fraction ``alpha`` of the way from ``cond`` to the stock voice ``stock``: the
    style and the EQ gains (dB) linearly, the warp and the pitch geometrically, so that 0 is
    ``cond`` and 1 the stock voice itself."""
    style = KokoroEngine.style_pack(cond)
    stock_style = KokoroEngine.style_pack(stock)
    voicing = KokoroEngine.voicing(cond)
    arrays = {"style": ((1 - alpha) * style + alpha * stock_style).astype(np.float32),
              "warp": np.array([voicing.warp ** (1 - alpha)], np.float32),
              "pitch": np.array([voicing.pitch ** (1 - alpha)], np.float32)}
    if voicing.eq is not None:
        arrays["eq"] = ((1 - alpha) * voicing.eq).astype(np.float32)
    return Conditioning(arrays, {**cond.meta, "stage": f"toward {stock.meta.get('voice')} by {alpha:g}"})


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def engine_figures(engine: KokoroEngine) -> None:
    """RTF against a bare onnxruntime call, a cloned voice's RTF, time to first chunk, memory."""
    import psutil

    proc = psutil.Process()
    voice = engine.default_conditioning()
    (ps,) = engine.phonemize(RTF_TEXT)
    tokens = engine.tokens(ps)[:MAX_TOKENS]
    style = engine.style_pack(voice)[len(tokens)].reshape(1, 256)
    audio = engine.synthesize_all(RTF_TEXT, voice)
    dur = len(audio) / engine.sample_rate
    backend = engine.backend
    assert backend is not None
    t_bare, t_eng = _best_of_each([lambda: backend.run(tokens, style, 1.0, 1.0), lambda: engine.synthesize_all(RTF_TEXT, voice)], 7)
    print(f"RTF ({dur:.1f} s audio, {len(tokens)} tokens): engine {t_eng / dur:.3f}, bare {backend.name} {t_bare / dur:.3f} "
          f"(front end + overhead {1000 * (t_eng - t_bare):.0f} ms)")

    # a cloned voice also carries a pitch/formant warp and an EQ, applied after the model
    from voiced.engines.kokoro import post

    cloned = Conditioning.from_npz({**dict(voice), "warp": np.array([1.08], np.float32),
                                    "eq": np.linspace(-6, 6, post.N_BANDS).astype(np.float32)}, {})
    cloned_dur = len(engine.synthesize_all(RTF_TEXT, cloned)) / engine.sample_rate
    t_cloned = _best_of(lambda: engine.synthesize_all(RTF_TEXT, cloned))
    print(f"RTF of a cloned voice (warp 1.08 and EQ): {t_cloned / cloned_dur:.3f} "
          f"({t_cloned / cloned_dur / (t_eng / dur):.2f}x the stock voice's)")

    def first_chunk() -> None:
        next(iter(engine.synthesize(THREE, voice, {})))

    ttfc = _best_of(first_chunk)
    total = _best_of(lambda: list(engine.synthesize(THREE, voice, {})))
    print(f"three sentences: first chunk after {1000 * ttfc:.0f} ms, all after {1000 * total:.0f} ms")
    print(f"RSS: {proc.memory_info().rss / 2**20:.0f} MiB")
    long_text = " ".join(["The quick brown fox jumps over the lazy dog by the river, then runs away"] * 4) + "."  # one sentence
    engine.synthesize_all(long_text, voice)
    grown = proc.memory_info().rss
    t0 = time.perf_counter()
    engine.release_memory()
    print(f"RSS after a {len(engine.tokens(engine.phonemize(long_text)[0]))}-token input: {grown / 2**20:.0f} MiB; "
          f"after release_memory ({1000 * (time.perf_counter() - t0):.0f} ms; the daemon calls it after "
          f"{IDLE_RELEASE_S:.0f} s without synthesis): {proc.memory_info().rss / 2**20:.0f} MiB")

    def after_release() -> None:
        engine.release_memory()
        t0 = time.perf_counter()
        engine.synthesize_all(RTF_TEXT, voice)
        times.append(time.perf_counter() - t0)

    times: list[float] = []
    _, t_warm = _best_of_each([after_release, lambda: engine.synthesize_all(RTF_TEXT, voice)], 5)
    print(f"the RTF text right after a release {min(times):.3f} s, warm {t_warm:.3f} s (best of five each)")


class Intelligibility:
    """Word error counts of the engine's outputs, as pocketsphinx hears them."""

    def __init__(self, engine: KokoroEngine, recognise: Recogniser) -> None:
        self.engine = engine
        self.recognise = recognise

    def counts(self, texts: Sequence[str], audio: Sequence[np.ndarray]) -> list[tuple[int, int]]:
        """(errors, words) per text, for the 24 kHz outputs ``audio``."""
        return [wer(text, self.recognise(resample_24k_to_16k(a))) for text, a in zip(texts, audio)]

    @staticmethod
    def rate(counts: Sequence[tuple[int, int]]) -> float:
        return sum(e for e, _ in counts) / sum(n for _, n in counts)

    def of(self, cond: Conditioning, sim_audio: Sequence[np.ndarray] = (), speed: float = 1.0) -> tuple[float, float]:
        """(WER on all of WER_TEXTS, WER on SIM_TEXTS alone); ``sim_audio``: outputs already spoken
        for the first texts (the similarity's), the rest are synthesized at ``speed``."""
        spoken = list(sim_audio)
        audio = [*spoken, *(self.engine.synthesize_all(text, cond, {"speed": speed}) for text in WER_TEXTS[len(spoken):])]
        counts = self.counts(WER_TEXTS, audio)
        return self.rate(counts), self.rate(counts[: len(SIM_TEXTS)])


def base_voice_figures(engine: KokoroEngine, heard: Intelligibility) -> None:
    """Each base voice's WER on BASE_VOICE_TEXTS and on the held-out sentences."""
    for name in sorted(engine.voices):
        cond = engine.base_conditioning(name)
        counts = heard.counts(BASE_VOICE_TEXTS, [engine.synthesize_all(text, cond) for text in BASE_VOICE_TEXTS])
        errors, words = sum(e for e, _ in counts), sum(n for _, n in counts)
        fifteen, five = heard.of(cond)
        print(f"{name}: WER {heard.rate(counts):.1%} ({errors} of {words} words, {len(BASE_VOICE_TEXTS)} sentences); "
              f"on the {len(WER_TEXTS)} held-out sentences {fifteen:.1%}, the five similarity sentences {five:.1%}")


def clone_figures(engine: KokoroEngine, fitter: StyleFitter, heard: Intelligibility | None, name: str, args: argparse.Namespace) -> None:
    """Fit one test speaker and print its similarity (and WER) figures, stock / quick / refined."""
    import soundfile as sf

    from voiced.encoder import cosine

    wav, sr = sf.read(TESTDATA / "voices" / name, dtype="float32")
    emb = engine.encoder.embed(wav)
    t0 = time.perf_counter()
    quick = engine.prepare_voice(wav, emb, stage="quick")
    t_quick = time.perf_counter() - t0
    t0 = time.perf_counter()
    refined = engine.prepare_voice(wav, emb, stage="refined", budget_s=args.fit_budget, previous=quick)
    t_ref = time.perf_counter() - t0
    # a second recording of the speaker (X_b.*), never seen by the fitter: a check that the
    # similarity is the speaker's, not only the first clip's
    others = sorted((TESTDATA / "voices").glob(name.replace("_a.", "_b.").rsplit(".", 1)[0] + ".*"))
    emb_b = engine.encoder.embed(sf.read(others[0], dtype="float32")[0]) if others else None
    cross: dict[str, float] = {}
    whole: dict[str, float] = {}
    spoken: dict[str, list[np.ndarray]] = {}  # SIM_TEXTS' audio per label: the WER is taken on the same outputs

    def speak(cond: Conditioning) -> tuple[list[np.ndarray], list[np.ndarray], float]:
        """SIM_TEXTS spoken in ``cond``, each output's embedding, and their mean cosine to the reference."""
        audio = [engine.synthesize_all(text, cond) for text in SIM_TEXTS]
        outs = [fitter.embed_audio(a) for a in audio]
        return audio, outs, float(np.mean([cosine(o, emb) for o in outs]))

    def sim_of(cond: Conditioning, label: str) -> float:
        """The similarity, keeping the audio and the figures beside it under ``label``."""
        audio, outs, sim = speak(cond)
        spoken[label] = audio
        whole[label] = cosine(fitter.embed_audio(np.concatenate(audio)), emb)
        if emb_b is not None:
            cross[label] = float(np.mean([cosine(o, emb_b) for o in outs]))
        return sim

    stock_sims = {voice: sim_of(engine.base_conditioning(voice), voice) for voice in sorted(engine.voices)}
    stock_name = max(stock_sims, key=stock_sims.get)
    stock = engine.base_conditioning(stock_name)
    cross["stock"] = cross.get(stock_name, float("nan"))
    whole["stock"] = whole.get(stock_name, float("nan"))
    sims = {"stock": stock_sims[stock_name], "quick": sim_of(quick, "quick"), "refined": sim_of(refined, "refined")}
    wers = {}
    if heard is not None:
        for label, cond, key in (("stock", stock, stock_name), ("quick", quick, "quick"), ("refined", refined, "refined")):
            wers[label] = heard.of(cond, spoken[key])
    warp = float(np.asarray(refined["warp"]).reshape(-1)[0]) if "warp" in refined else 1.0
    pitch = float(np.asarray(refined["pitch"]).reshape(-1)[0]) if "pitch" in refined else 1.0
    eq = np.asarray(refined["eq"]) if "eq" in refined else np.zeros(1)
    print(f"{name}: stock({stock_name}) {sims['stock']:.3f}  quick {sims['quick']:.3f} ({t_quick:.1f} s)  "
          f"refined {sims['refined']:.3f} ({t_ref:.0f} s, {refined.meta['evaluations']} evals)  "
          f"gain {sims['refined'] - sims['stock']:+.3f}  [refined warp {warp:.3f}, pitch {pitch:.3f}, eq {eq.min():+.1f}..{eq.max():+.1f} dB; "
          f"targets >= 0.80 {'met' if sims['refined'] >= 0.80 else 'NOT met'}, "
          f"gain >= +0.15 {'met' if sims['refined'] - sims['stock'] >= 0.15 else 'NOT met'}]")
    print(f"{name}: the five sentences embedded as one utterance, as the reference is: stock {whole['stock']:.3f}  "
          f"quick {whole['quick']:.3f}  refined {whole['refined']:.3f}")
    if emb_b is not None:
        print(f"{name}: vs {others[0].name} (unseen clip): stock {cross['stock']:.3f}  quick {cross['quick']:.3f}  "
              f"refined {cross['refined']:.3f}; EQ tuning {refined.meta.get('eq_tuning')}")
        # the scale for real speech: the other recording, in pieces as long as the sentences
        wav_b = sf.read(others[0], dtype="float32")[0]
        n = int(len(spoken["refined"][0]) / engine.sample_rate * 16_000)
        pieces = [wav_b[i:i + n] for i in range(0, len(wav_b) - n + 1, n)]
        print(f"{name}: real speech for scale, {others[0].name} vs the reference: in {len(pieces)} pieces of "
              f"{n / 16_000:.1f} s {np.mean([cosine(engine.encoder.embed(p), emb) for p in pieces]):.3f}, "
              f"whole {cosine(emb_b, emb):.3f}")
    if heard is None:
        return
    ratio = wers["refined"][0] / wers["stock"][0] if wers["stock"][0] > 0 else float("inf") if wers["refined"][0] > 0 else 1.0
    print(f"{name}: WER stock {wers['stock'][0]:.1%}  quick {wers['quick'][0]:.1%}  refined {wers['refined'][0]:.1%}  "
          f"refined/stock {ratio:.2f} ({'within' if ratio <= 1.25 else 'OVER'} the 1.25x limit); "
          f"on the five similarity sentences alone: stock {wers['stock'][1]:.1%}  quick {wers['quick'][1]:.1%}  "
          f"refined {wers['refined'][1]:.1%}")
    if args.wer_speeds:
        means = {label: np.mean([heard.of(cond, speed=speed) for speed in JITTER_SPEEDS], axis=0)
                 for label, cond in (("stock", stock), ("refined", refined))}
        print(f"{name}: mean WER over speeds {JITTER_SPEEDS[0]}-{JITTER_SPEEDS[-1]}: stock {means['stock'][0]:.1%}  "
              f"refined {means['refined'][0]:.1%} ({means['refined'][0] / means['stock'][0]:.2f}x); on the five "
              f"similarity sentences alone: stock {means['stock'][1]:.1%}  refined {means['refined'][1]:.1%} "
              f"({means['refined'][1] / means['stock'][1]:.2f}x)")
    if args.tradeoff:
        steps = [f"0 (refined): {sims['refined']:.3f}, {wers['refined'][1]:.1%} / {wers['refined'][0]:.1%}"]
        for alpha in TRADEOFF_STEPS:
            between = toward(refined, stock, alpha)
            audio, _, sim = speak(between)
            fifteen, five = heard.of(between, audio)
            steps.append(f"{alpha:g}: {sim:.3f}, {five:.1%} / {fifteen:.1%}")
        steps.append(f"1 ({stock_name}): {sims['stock']:.3f}, {wers['stock'][1]:.1%} / {wers['stock'][0]:.1%}")
        print(f"{name}: from refined to stock, similarity, WER on the five / all {len(WER_TEXTS)}: " + "; ".join(steps))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "voiced-kokoro-bench"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="onnx", choices=("onnx", "torch"))
    ap.add_argument("--fit-budget", type=float, default=60.0)
    ap.add_argument("--no-fit", action="store_true")
    ap.add_argument("--speakers", default="allison_a.wav,carlo_a.wav,june_a.wav")
    ap.add_argument("--wer-speeds", action="store_true",
                    help=f"also take the stock and refined WER at speeds {', '.join(map(str, JITTER_SPEEDS))} "
                         "and print their means: how much of a difference is the sentences' luck")
    ap.add_argument("--tradeoff", action="store_true",
                    help=f"also print similarity and WER for voices {', '.join(map(str, TRADEOFF_STEPS))} of the way "
                         "from each refined voice to its best stock voice")
    ap.add_argument("--base-voices", action="store_true",
                    help="print each base voice's WER on BASE_VOICE_TEXTS and on the held-out sentences, and stop")
    args = ap.parse_args()
    print(describe(), flush=True)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("voiced.engines.kokoro.fitting").setLevel(logging.INFO)  # each fit's evaluations, warp, pitch

    import psutil

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    engine = KokoroEngine(args.cache, threads=args.threads, backend=args.backend)
    t0 = time.perf_counter()
    engine.load(args.device)
    print(f"load+warm-up: {time.perf_counter() - t0:.2f} s on {engine.device}; "
          f"RSS after load {proc.memory_info().rss / 2**20:.0f} MiB (+{(proc.memory_info().rss - rss0) / 2**20:.0f})")
    engine_figures(engine)
    if args.no_fit:
        return 0
    try:
        from voiced.encoder import SpeakerEncoder  # torch, the GE2E weights
    except ImportError as exc:
        print(f"cloning skipped: {exc}")
        return 0
    try:
        import pocketsphinx

        heard: Intelligibility | None = Intelligibility(engine, Recogniser())
        print(f"WER by pocketsphinx {getattr(pocketsphinx, '__version__', None) or _dist_version('pocketsphinx')} "
              f"on {len(WER_TEXTS)} held-out sentences ({sum(len(_words(t)) for t in WER_TEXTS)} words)")
    except ImportError:
        heard = None
        print("WER skipped: pip install pocketsphinx")
    if args.base_voices:
        if heard is None:
            return 1
        base_voice_figures(engine, heard)
        return 0
    engine._encoder = SpeakerEncoder(device="cpu")
    t0 = time.perf_counter()
    fitter = engine.fitter()
    print(f"fitter ready in {time.perf_counter() - t0:.1f} s")
    for name in args.speakers.split(","):
        clone_figures(engine, fitter, heard, name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
