"""Speaker encoder on an accelerator: agreement with CPU fp32 and resemblyzer, and speed.

    python bench/bench_encoder_device.py [--device cuda] [--testdata DIR] [--repeats 20]

For every clip of the test data it prints the cosine of the embedding made on ``--device`` (fp32
and bf16) to the CPU fp32 embedding and to resemblyzer's (golden-resemblyzer.json, ``pipeline``),
then the median time to embed one 12 s clip on each. Needs a CUDA build of torch for cuda.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402
from voiced.encoder import SpeakerEncoder, cosine  # noqa: E402


def main() -> int:
    default_data = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).resolve().parents[2] / "shared" / "testdata")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--testdata", type=Path, default=default_data)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(describe(), flush=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}): nothing to measure")
        return 0
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    print(f"torch {torch.__version__} on {name}")
    golden = json.loads((args.testdata / "golden-resemblyzer.json").read_text())
    encoders = {
        "cpu fp32": SpeakerEncoder(device="cpu", precision="fp32"),
        f"{args.device} fp32": SpeakerEncoder(device=args.device, precision="fp32"),
        f"{args.device} bf16": SpeakerEncoder(device=args.device, precision="bf16"),
    }
    clips = sorted(p for p in (args.testdata / "voices").iterdir() if p.suffix in (".wav", ".flac", ".ogg"))
    worst: dict[str, tuple[float, float]] = {}
    for clip in clips:
        embs = {label: enc.embed_file(clip) for label, enc in encoders.items()}
        gold = np.asarray(golden[clip.name]["pipeline"], np.float32)
        for label, emb in embs.items():
            to_cpu, to_gold = cosine(emb, embs["cpu fp32"]), cosine(emb, gold)
            old = worst.get(label, (1.0, 1.0))
            worst[label] = (min(old[0], to_cpu), min(old[1], to_gold))
    for label, (to_cpu, to_gold) in worst.items():
        print(f"{label}: worst cosine over {len(clips)} clips: to cpu fp32 {to_cpu:.7f}, to resemblyzer {to_gold:.6f}")
    wav = sf.read(clips[0], dtype="float32")[0]
    for label, enc in encoders.items():
        sync = torch.cuda.synchronize if "cuda" in label else (lambda: None)
        for _ in range(3):
            enc.embed(wav)
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            enc.embed(wav)
            sync()
            times.append(time.perf_counter() - t0)
        print(f"{label}: {len(wav) / 16_000:.1f} s clip embedded in {1000 * statistics.median(times):.2f} ms "
              f"(median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
