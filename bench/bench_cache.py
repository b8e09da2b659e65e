"""Micro-benchmark of voiced.store (the local artefact store): put/get latency and start-up reconcile figures.

Run: python bench/bench_cache.py [--dir DIR] [--n N]
Uses a fresh temporary cache directory (on the same filesystem as DIR when given, since
fsync cost depends on it).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402
from voiced.library.files import FileRecord, FileRecords  # noqa: E402
from voiced.store import LocalStore  # noqa: E402


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(label: str, samples: list[float]) -> None:
    ms = sorted(s * 1e3 for s in samples)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    print(f"{label:<42} median {statistics.median(ms):8.3f} ms   p95 {p95:8.3f} ms   (n={len(ms)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="parent directory for the temporary cache")
    parser.add_argument("--n", type=int, default=200, help="puts/gets per payload")
    parser.add_argument("--files", type=int, default=10_000, help="file records for the reconcile figures")
    args = parser.parse_args()
    print(describe(), flush=True)

    rng = np.random.default_rng(0)
    payloads = {
        "embedding (256 float32)": {"embedding": rng.standard_normal(256).astype(np.float32)},
        "conditioning (~400 KB, 3 arrays)": {
            "style": rng.standard_normal((510, 256)).astype(np.float32),
            "tokens": rng.integers(0, 1000, 512, dtype=np.int64),
            "ref": rng.standard_normal(50_000).astype(np.float32),
        },
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, LocalStore(Path(tmp) / "cache") as cache:
        print(f"cache in {tmp}")
        for n, (label, arrays) in enumerate(payloads.items()):
            base = (n + 1) * 1_000_000
            puts = [timed(lambda i=i: cache.put(sha(base + i), "bench@1", "k", arrays)) for i in range(args.n)]
            gets = [timed(lambda i=i: cache.get(sha(base + i), "bench@1", "k")) for i in range(args.n)]
            report(f"put {label}", puts)
            report(f"get hit {label}", gets)
        report("get miss", [timed(lambda i=i: cache.get(sha(-i - 1), "bench@1", "k")) for i in range(args.n)])
        report("has", [timed(lambda i=i: cache.has(sha(i), "bench@1", "k")) for i in range(args.n)])

        records = [
            FileRecord(f"speakers/{i // 100:03d}/take-{i:05d}.wav", 100_000 + i, 1_700_000_000_000_000_000 + i, 10_000 + i, sha(i))
            for i in range(args.files)
        ]
        files = FileRecords(cache.directory, "bench:/voices", cache)
        print(f"record({args.files:,} new)                   {timed(lambda: files.record(records)) * 1e3:8.1f} ms")
        print(f"record({args.files:,} updated)               {timed(lambda: files.record(records)) * 1e3:8.1f} ms")
        report(f"all() of {args.files:,} records", [timed(files.all) for _ in range(10)])
        report("record (one)", [timed(lambda i=i: files.record([records[i]])) for i in range(args.n)])
        print(f"sync ({args.files:,} files)                   {timed(files.sync) * 1e3:8.1f} ms")
        print(f"collect_garbage ({cache.stats().entries} entries, {args.files:,} files) "
              f"{timed(lambda: cache.collect_garbage(3600.0)) * 1e3:8.1f} ms")
        paths = [r.path for r in records]
        print(f"forget({args.files:,})                       {timed(lambda: files.forget(paths)) * 1e3:8.1f} ms")
        files.close()
        print(cache.stats())


if __name__ == "__main__":
    main()
