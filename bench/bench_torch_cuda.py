"""Kokoro's torch backend on a GPU, in one short run (also runs on a CPU, for a dry run).

    python bench/bench_torch_cuda.py [--device cuda] [--clients 64] [--seconds 20] [--batch 32]

Prints: load time; parity with the CPU (GE2E cosine, durations) on four sentences; the
real-time factor at batch 1 (best of five, a 14 s utterance); time to the first chunk of a
three-sentence text; throughput with many clients, batched and one by one; GPU memory after
load, at the peak, and per prepared voice (a voice's style pack stays in host memory and one
row is copied per sentence); and whether half precision (bf16, fp16) keeps the speaker
(cosine to float32 output).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_torch_batch import load as throughput  # noqa: E402
from machine import describe  # noqa: E402

from voiced.engines.kokoro import KokoroEngine  # noqa: E402

LONG = ("The old lighthouse keeper climbed the stairs every evening, lit the great lamp, and watched the "
        "ships pass safely through the narrow channel until morning came over the hills.")
THREE = "Good morning. The weather today is mild and dry, with light winds from the west. Have a nice day!"
PARITY = ("The quick brown fox jumps over the lazy dog.", "Could you tell me where the nearest pharmacy is?",
          "We measured the temperature every hour for three days.", "Keep the receipt.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(describe())
    import torch

    from voiced.encoder import SpeakerEncoder

    cache = Path(tempfile.mkdtemp(prefix="voiced-cuda-"))
    cpu = KokoroEngine(cache, backend="torch", batch=1)
    cpu.load("cpu")
    t0 = time.perf_counter()
    gpu = KokoroEngine(cache, backend="torch", batch=args.batch)
    gpu.load(args.device)
    print(f"load on {gpu.device}: {time.perf_counter() - t0:.2f} s (weights already extracted), warm-up included")
    cuda = gpu.backend.torch_device.type == "cuda"  # type: ignore[union-attr]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    loaded_mb = torch.cuda.memory_allocated() / 2**20 if cuda else float("nan")
    encoder = SpeakerEncoder(device="cpu")
    voice = gpu.default_conditioning()
    cosines, frames = [], []
    for text in PARITY:
        a, b = cpu.synthesize_all(text, voice), gpu.synthesize_all(text, voice)
        ea, eb = encoder.embed(a), encoder.embed(b)
        cosines.append(float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb))))
        frames.append(abs(len(a) - len(b)) // 600)
    print(f"parity with the CPU, {len(PARITY)} sentences: GE2E cosine min {min(cosines):.4f}, "
          f"durations apart by at most {max(frames)} frames")

    audio = gpu.synthesize_all(LONG, voice)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        gpu.synthesize_all(LONG, voice)
        sync()
        best = min(best, time.perf_counter() - t0)
    print(f"RTF at batch 1: {best / (len(audio) / 24_000):.4f} ({len(audio) / 24_000:.1f} s of audio in {best * 1000:.0f} ms)")
    sync()
    t0 = time.perf_counter()
    next(iter(gpu.synthesize(THREE, voice, {})))
    sync()
    print(f"first chunk of a three-sentence text: {1000 * (time.perf_counter() - t0):.0f} ms")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batcher = gpu.backend.batcher  # type: ignore[union-attr]
    for size in (args.batch, 1):
        batcher.max_batch = size
        b0, i0 = batcher.batches, batcher.items
        rps, aps, count = throughput(args.clients, args.seconds, gpu)
        per = (batcher.items - i0) / max(1, batcher.batches - b0)
        print(f"{args.clients} clients, batch <= {size}: {rps:.1f} requests/s, {aps:.1f} audio-s/s "
              f"({count} requests, {per:.1f} sentences per model call)")
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        pack_mb = gpu.voices[gpu.default_voice].nbytes / 2**20
        print(f"GPU memory: {loaded_mb:.0f} MiB after load, peak {peak:.0f} MiB under load; per prepared voice "
              f"0 MiB on the GPU ({pack_mb:.2f} MiB style pack in host memory)")

    net = gpu.backend.net  # type: ignore[union-attr]
    (ps,) = gpu.phonemize(PARITY[0])
    tokens = torch.tensor([0, *gpu.tokens(ps), 0], device=gpu.backend.torch_device)  # type: ignore[union-attr]
    style = torch.tensor(gpu.voices[gpu.default_voice][len(tokens) - 2][None], device=tokens.device)
    one = torch.ones(1, device=tokens.device)
    with torch.inference_mode():
        ref = net.batch([tokens], style, one, one)[0]
        for dtype in (torch.bfloat16, torch.float16):
            try:
                with torch.autocast(device_type=tokens.device.type, dtype=dtype):
                    out = net.batch([tokens], style, one, one, durations=[ref.durations])[0]
                a, b = ref.audio.float().cpu().numpy(), out.audio.float().cpu().numpy()
                ea, eb = encoder.embed(a), encoder.embed(b)
                print(f"{dtype}: GE2E cosine to float32 {float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb))):.4f}")
            except Exception as exc:  # noqa: BLE001 - a dtype the device cannot run is a finding too
                print(f"{dtype}: not usable here ({type(exc).__name__}: {str(exc)[:120]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
