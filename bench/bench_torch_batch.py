"""Batched synthesis: throughput of Kokoro's torch backend with 1, 4 and 16 clients at once.

    python bench/bench_torch_batch.py [--clients 1,4,16] [--seconds 40] [--batch 16] [--device cpu]

Each client is a thread that asks the engine for one sentence after another (sentences of
different lengths, each client its own voice), as the daemon's request threads would. For
each number of clients it prints requests/s and audio-seconds/s with batching (calls made at
the same time share one padded model call, up to --batch) and without (--batch 1), in one run,
then onnxruntime's figures for the same load (its session runs calls side by side).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402

from voiced.engines.kokoro import KokoroEngine  # noqa: E402

SENTENCES = (
    "The train to Edinburgh leaves from platform nine.",
    "Could you tell me where the nearest pharmacy is, please?",
    "We measured the temperature every hour for three days.",
    "His voice was calm.",
    "After the storm, the fishermen repaired their nets on the beach before sunset.",
    "Keep the receipt.",
)


def load(clients: int, seconds: float, engine: KokoroEngine) -> tuple[float, float, int]:
    """(requests/s, audio-seconds/s, requests) with ``clients`` threads for ``seconds``."""
    voices = sorted(engine.voices)
    done = [0] * clients
    audio = [0.0] * clients
    stop = threading.Event()

    def client(k: int) -> None:
        cond = engine.base_conditioning(voices[k % len(voices)])
        i = k
        while not stop.is_set():
            out = engine.synthesize_all(SENTENCES[i % len(SENTENCES)], cond)
            if stop.is_set():
                return  # finished after the window: not counted
            done[k] += 1
            audio[k] += len(out) / engine.sample_rate
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - t0
    for t in threads:
        t.join()
    return sum(done) / elapsed, sum(audio) / elapsed, sum(done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    print(describe())
    cache = Path(tempfile.mkdtemp(prefix="voiced-batch-"))
    clients = [int(c) for c in args.clients.split(",")]

    torch_engine = KokoroEngine(cache, backend="torch", batch=args.batch, threads=args.threads)
    torch_engine.load(args.device)
    print(f"torch on {torch_engine.device}, batches of up to {args.batch}, {args.seconds:g} s per row")
    batcher = torch_engine.backend.batcher  # type: ignore[union-attr]
    for n in clients:
        for size in (args.batch, 1):
            batcher.max_batch = size
            batches0, items0 = batcher.batches, batcher.items
            rps, aps, count = load(n, args.seconds, torch_engine)
            per = (batcher.items - items0) / max(1, batcher.batches - batches0)
            print(f"  {n:2d} clients, batch <= {size:2d}: {rps:6.2f} requests/s, {aps:7.2f} audio-s/s "
                  f"({count} requests, {per:.1f} sentences per model call)")
    if not args.no_onnx:
        onnx_engine = KokoroEngine(cache, backend="onnx", threads=args.threads)
        onnx_engine.load(args.device)
        print(f"onnxruntime on {onnx_engine.device}")
        for n in clients:
            rps, aps, count = load(n, args.seconds, onnx_engine)
            print(f"  {n:2d} clients: {rps:6.2f} requests/s, {aps:7.2f} audio-s/s ({count} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
