"""Probe: the gradient fit's F0 tracker (gradfit.f0_track) against pYIN, on the test references.

    python bench/probe_f0_tracker.py [threshold=0.15] [window=512] [hop=160]

The fit's F0 view pulls the voice's mean and spread of log F0 (semitones) to the reference's,
as ``f0_track`` measures them. An octave error counts 12 semitones, so a handful of them inflate
the spread the fit aims at. Printed per clip: voiced frames, mean and spread (semitones re 1 Hz)
from ``f0_track`` and from librosa's pYIN (a probabilistic YIN with Viterbi smoothing, far
costlier), and the share of ``f0_track``'s frames more than 6 semitones from the clip's median.
Needs librosa (the ``bench`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kokoro import TESTDATA  # noqa: E402
from machine import describe  # noqa: E402
from voiced.audio import load_audio  # noqa: E402
from voiced.engines.kokoro.gradfit import F0_RANGE_HZ, f0_track, semitones  # noqa: E402


def stats(st: np.ndarray) -> str:
    if len(st) < 2:
        return f"{len(st):5d} frames"
    return f"{len(st):5d} frames, mean {st.mean():6.2f}, spread {st.std():5.2f}"


KW: dict = {}


def main() -> int:
    for kv in sys.argv[1:]:
        k, v = kv.split("=")
        KW[k] = int(v) if k in ("window", "hop") else float(v)
    import librosa

    print(describe())
    for path in sorted((TESTDATA / "voices").iterdir()):
        if path.suffix not in (".wav", ".flac", ".ogg"):
            continue
        x = load_audio(path, sample_rate=16_000).samples
        ours = semitones(f0_track(x, **KW))
        f0, voiced, _ = librosa.pyin(x.astype(np.float64), fmin=F0_RANGE_HZ[0], fmax=F0_RANGE_HZ[1], sr=16_000,
                                     frame_length=1024, hop_length=160)
        theirs = semitones(f0[voiced & np.isfinite(f0)])
        astray = float(np.mean(np.abs(ours - np.median(ours)) > 6)) if len(ours) else 0.0
        print(f"{path.stem:10s} f0_track {stats(ours)}, {astray:5.1%} astray | pYIN {stats(theirs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
