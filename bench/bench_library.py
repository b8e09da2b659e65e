"""Voice library benchmarks: file closed -> ready latency, and a folder of 10,000 voices.

    python bench/bench_library.py [--files 10000] [--latency-runs 30]

(1) Latency: a recording is written into a watched folder (real inotify observer, real cache
    on disk, real encoder); the time from the writer's close() to the voice's ``ready`` event,
    against the bare encoder time (``SpeakerEncoder.embed`` on the same samples) measured in the
    same run. Target: p50 <= encoder time + 20 ms.
(2) 10,000 voices: the first reconcile of a folder nobody has seen (walk + hash + index), a warm
    restart with every voice already prepared (target <= 2 s to all ready), and memory per voice.
    The 10,000 files are short distinct recordings; their cache entries are written through the
    cache's public API before the warm restart (the encoder is not what this part measures).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from voiced.store import LocalStore
from voiced.config import VoicesConfig
from voiced.embedding import embedding_kind
from voiced.encoder import SpeakerEncoder
from voiced.fsutil import sha256_file
from voiced.library import Library
from voiced.watcher import FolderWatcher

TESTDATA = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).resolve().parents[2] / "shared" / "testdata")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_latency(runs: int, workdir: Path, encoder: SpeakerEncoder) -> None:
    clips = sorted((TESTDATA / "voices").iterdir())
    sources = [sf.read(p, dtype="float32") for p in clips]
    voices = workdir / "latency" / "voices"
    voices.mkdir(parents=True)
    config = VoicesConfig(dir=voices, settle_s=1.0)
    cache = LocalStore(workdir / "latency" / "cache")
    ready_at: dict[str, float] = {}
    done = threading.Condition()

    def on_event(event: str, voice: dict[str, Any]) -> None:
        if event == "ready":
            with done:
                ready_at[voice["name"]] = time.perf_counter()
                done.notify_all()

    library = Library(config, cache, encoder, listeners=[on_event])
    library.start()
    watcher = FolderWatcher(library, config)
    watcher.start()
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    encoder_times: list[float] = []
    try:
        for i in range(runs):
            samples, rate = sources[i % len(sources)]
            # distinct content every run (tiny dither), so every file is a cache miss
            wav = (samples + rng.normal(0, 1e-4, samples.shape)).astype(np.float32)
            name = f"run{i:03d}"
            with open(voices / f"{name}.wav", "wb") as fh:
                sf.write(fh, wav, rate, format="WAV", subtype="PCM_16")
                fh.flush()
            closed = time.perf_counter()  # the close happens as the with-block ends, just before this
            with done:
                if not done.wait_for(lambda: name in ready_at, 60):
                    raise RuntimeError(f"{name} never became ready: {library.get(name)}")
            latencies.append(ready_at[name] - closed)
            pcm = sf.read(voices / f"{name}.wav", dtype="float32")[0]
            started = time.perf_counter()
            encoder.embed(pcm)
            encoder_times.append(time.perf_counter() - started)
    finally:
        watcher.stop()
        library.stop()
        cache.close()
    enc50, lat50 = percentile(encoder_times, 50) * 1000, percentile(latencies, 50) * 1000
    print(f"(1) file closed -> ready, {runs} recordings of 12 s (inotify, cache on disk)")
    print(f"    encoder alone        p50 {enc50:7.1f} ms   p99 {percentile(encoder_times, 99) * 1000:7.1f} ms")
    print(f"    closed -> ready      p50 {lat50:7.1f} ms   p99 {percentile(latencies, 99) * 1000:7.1f} ms")
    print(f"    overhead at p50      {lat50 - enc50:7.1f} ms   (target <= 20 ms)")


class _Unused:
    """Stands in for the encoder where a benchmark must show it is never called."""

    def __init__(self, real: SpeakerEncoder) -> None:
        self.model_id, self.version = real.model_id, real.version
        self.calls = 0

    def embed(self, wav: np.ndarray, *, preprocess: bool = True) -> np.ndarray:
        self.calls += 1
        raise RuntimeError("the encoder was called during a warm restart")


def make_folder(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        sub = root / f"group{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"voice{i:05d}.wav"
        sf.write(path, (rng.normal(0, 0.1, 1600)).astype(np.float32), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


def bench_many(count: int, workdir: Path, encoder: SpeakerEncoder) -> None:
    voices = workdir / "many" / "voices"
    cache_dir = workdir / "many" / "cache"
    paths = make_folder(voices, count)
    config = VoicesConfig(dir=voices, min_duration_s=0.0, rename_grace_s=3600.0)
    stand_in = _Unused(encoder)

    # first reconcile: nothing known, every file walked and hashed, the index written
    cache = LocalStore(cache_dir)
    library = Library(config, cache, stand_in)
    report, _ = library.reconcile()
    print(f"(2) folder of {count} voices")
    print(f"    first reconcile      {report.seconds:7.2f} s    ({report.hashed} hashed, {report.queued} queued)")
    cache.close()

    # prepare every voice (entries written through the cache API, in parallel: each put fsyncs)
    cache = LocalStore(cache_dir)
    kind = embedding_kind(True, config.max_duration_s)
    producer = f"{encoder.model_id}@{encoder.version}"
    def put(path: Path) -> None:
        vec = np.random.default_rng(abs(hash(path.name))).normal(size=256).astype(np.float32)
        cache.put(sha256_file(path), producer, kind, {"embedding": vec / np.linalg.norm(vec)},
                  {"duration_s": 0.1, "used_s": 0.1, "truncated": False})

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, paths))
    print(f"    (setup: {count} cache entries written in {time.perf_counter() - started:.1f} s)")
    cache.close()

    # warm restart: a new library over the same folder and cache, as after a daemon restart
    gc.collect()
    started = time.perf_counter()
    cache = LocalStore(cache_dir)
    library = Library(config, cache, stand_in)
    report, _ = library.reconcile()
    counts = library.counts()
    elapsed = time.perf_counter() - started
    assert counts["ready"] == count, counts
    assert stand_in.calls == 0 and report.hashed == 0
    print(f"    warm restart         {elapsed:7.2f} s    ({counts['ready']} ready, {report.hashed} re-hashed; target <= 2 s)")
    cache.close()
    del library

    # memory: what the library holds per voice (Python heap, traced on a second warm restart)
    gc.collect()
    tracemalloc.start()
    cache = LocalStore(cache_dir)
    library = Library(config, cache, stand_in)
    library.reconcile()
    gc.collect()
    held, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"    memory per voice     {held / count:7.0f} B    (Python heap held by the library after a warm restart)")
    cache.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None, help="on the disk to measure (default: a temp dir)")
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    if not (TESTDATA / "voices").is_dir():
        print(f"test data not found at {TESTDATA}; set VOICED_TESTDATA", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="voiced-bench-", dir=args.workdir))
    try:
        encoder = SpeakerEncoder(device="cpu")
        print(f"voiced library bench: {os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}, "
              f"workdir {workdir}")
        bench_latency(args.latency_runs, workdir, encoder)
        bench_many(args.files, workdir, encoder)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
