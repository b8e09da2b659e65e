"""Probe: can the quick stage skip its one real synthesis?

    python bench/probe_quick_surrogate.py [--cuts 24]

Today's quick stage blends the base voices by their embeddings, then speaks the calibration
sentence once to check the blend (keeping the best single base voice if the blend does worse)
and to match the EQ to the blend's own spectrum. That synthesis is ~90% of its cost.
The surrogate does neither: the blend as the embeddings predict it, the EQ matched against the
base voices' spectra mixed with the blend's weights.

For the six test clips and --cuts 2-4 s cuts of them (as a bulk drop has), both voices and the
nearest stock voice speak two held-out sentences; printed: GE2E cosine of each to the reference
embedding (telephone-band matched: every output low-passed to the reference's bandwidth), the
time each stage took, and how often the surrogate loses more than 0.01 to the checked blend.
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

from machine import describe  # noqa: E402
from voiced.audio import load_audio  # noqa: E402
from voiced.encoder import SpeakerEncoder  # noqa: E402
from voiced.engines.kokoro import KokoroEngine  # noqa: E402

TESTDATA = Path(os.environ.get("VOICED_TESTDATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))
HELD_OUT = ("I went to the market yesterday and bought some fresh bread and a few apples.",
            "We should probably leave soon if we want to catch the last train home.")


def band_limit(audio24k: np.ndarray, cutoff_hz: float = 3800.0) -> np.ndarray:
    """The clip as a telephone line would carry it: like is compared with like."""
    from scipy.signal import butter, sosfiltfilt

    sos = butter(8, cutoff_hz, fs=24_000, output="sos")
    return sosfiltfilt(sos, np.asarray(audio24k, np.float64)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, default=24)
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    encoder = SpeakerEncoder()
    engine = KokoroEngine(Path(tempfile.gettempdir()) / "voiced-probe-cache", encoder=encoder)
    engine.load("cpu")
    fitter = engine.fitter()
    clips = []
    for path in sorted((TESTDATA / "voices").iterdir()):
        clips.append((path.name, load_audio(path).samples))
    rng = np.random.default_rng(0)
    for i in range(args.cuts):
        name, audio = clips[i % 6]
        length = int(rng.uniform(2.0, 4.0) * 16_000)
        start = int(rng.integers(0, len(audio) - length))
        clips.append((f"{name}[{start / 16000:.1f}+{length / 16000:.1f}s]", audio[start:start + length]))

    def judge(cond, emb) -> float:
        outs = [fitter.embed_audio(band_limit(engine.synthesize_all(text, cond))) for text in HELD_OUT]
        return float(np.mean([o @ emb for o in outs]))

    rows = []
    for name, audio in clips:
        emb = encoder.embed(audio)
        emb = emb / np.linalg.norm(emb)
        t0 = time.perf_counter()
        checked = fitter.quick(emb, audio)
        t_checked = time.perf_counter() - t0
        t0 = time.perf_counter()
        guessed = fitter.quick(emb, audio, check=False)
        t_guessed = time.perf_counter() - t0
        stock = fitter.stock(emb)
        row = (judge(stock, emb), judge(checked, emb), judge(guessed, emb), t_checked, t_guessed)
        rows.append(row)
        kept = "blend" if max(checked.meta["weights"].values()) < 0.999 else "single"
        print(f"{name:32s} stock {row[0]:.3f}  checked {row[1]:.3f} ({kept}, {t_checked * 1000:.0f} ms)  "
              f"surrogate {row[2]:.3f} ({t_guessed * 1000:.0f} ms)", flush=True)
    r = np.asarray(rows)
    loss = r[:, 1] - r[:, 2]
    print(f"\n{len(rows)} clips, GE2E cosine on {len(HELD_OUT)} held-out sentences, telephone band:")
    print(f"  stock {r[:, 0].mean():.3f}, checked quick {r[:, 1].mean():.3f}, surrogate quick {r[:, 2].mean():.3f}")
    print(f"  surrogate minus checked: mean {-loss.mean():+.3f}, worst {-loss.max():+.3f}; "
          f"{int((loss > 0.01).sum())} of {len(rows)} lose more than 0.01; "
          f"{int((r[:, 2] < r[:, 0]).sum())} fall below stock (checked: {int((r[:, 1] < r[:, 0]).sum())})")
    print(f"  time per voice: checked {np.median(r[:, 3]) * 1000:.0f} ms, surrogate {np.median(r[:, 4]) * 1000:.0f} ms (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
