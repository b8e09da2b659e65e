"""A bulk drop: how soon every voice of a large folder is usable, and at which stage.

    python bench/bench_drop.py [--files 2000] [--until stock|quick|refined] [--limit-s 3600]

A real daemon (Kokoro on this machine's device, real watched folder, real cache) is started on an
empty folder; then --files distinct recordings (2-4 s cut from the test speakers, each at its own
gain) are renamed into it at once. Once a second the bench asks for `voices` and samples the
daemon's RSS; a second client asks for `status` --status-hz times a second. It prints, over time,
how many voices are usable (ready at any stage) and at each stage, then: the time until every
voice was usable, until every voice reached quick (and refined, with --until refined), status
latency p50/p99/max during the drop, and RSS at the start, peak and end.
Targets on a 2-core machine for 2,000 files: all usable within 3 minutes, all at quick within
30, status within 50 ms throughout, memory flat.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402
from voiced.client import Client  # noqa: E402
from voiced.testing import DaemonProcess  # noqa: E402

TESTDATA = Path(os.environ.get("VOICED_TESTDATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))
STAGES = ("stock", "quick", "refined")


def make_clips(staging: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    sources = [sf.read(p, dtype="float32") for p in sorted((TESTDATA / "voices").iterdir())]
    paths = []
    for i in range(count):
        audio, rate = sources[i % len(sources)]
        length = int(rng.uniform(2.0, 4.0) * rate)
        start = int(rng.integers(0, len(audio) - length))
        path = staging / f"v{i:05d}.wav"
        sf.write(path, audio[start:start + length] * float(rng.uniform(0.4, 1.0)), rate, subtype="PCM_16")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--until", choices=STAGES, default="quick", help="the stage every voice must reach")
    parser.add_argument("--limit-s", type=float, default=3600.0, help="give up after this long")
    parser.add_argument("--refine-budget-s", type=float, default=60.0)
    parser.add_argument("--status-hz", type=float, default=5.0, help="how often a second client asks for status")
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="voiced-bench-drop-"))
    staging = work / "staging"
    staging.mkdir()
    clips = make_clips(staging, args.files)
    daemon = DaemonProcess(work / "daemon", {"engine": {"refine_budget_s": args.refine_budget_s},
                                             "log": {"level": "warning"}}).start()
    assert daemon.proc is not None
    process = psutil.Process(daemon.proc.pid)
    rss = [process.memory_info().rss]
    status_ms: list[float] = []
    reached: dict[str, float] = {}
    goal = STAGES.index(args.until)
    slow: list[tuple[float, float]] = []  # (seconds into the drop, ms) of answers over 50 ms
    stop = threading.Event()
    started = time.monotonic()

    def ask_status() -> None:  # its own client and thread: the voices listing never delays it
        with Client(daemon.tcp, timeout_s=120) as asker:
            while not stop.wait(1.0 / args.status_hz):
                t0 = time.perf_counter()
                asker.status()
                ms = (time.perf_counter() - t0) * 1000
                status_ms.append(ms)
                if ms > 50:
                    slow.append((time.monotonic() - started, ms))

    asker = threading.Thread(target=ask_status, daemon=True)
    try:
        with Client(daemon.tcp, timeout_s=120) as client:
            started = time.monotonic()
            for clip in clips:  # renamed in: each is complete at once
                os.rename(clip, daemon.voices / clip.name)
            # after the renames, which take this process's interpreter for a few tens of ms: the
            # asker measures the daemon, not this loop (the daemon sees the events from now on)
            asker.start()
            print(f"{args.files} files dropped in {time.monotonic() - started:.1f} s", flush=True)
            last_print = 0.0
            while time.monotonic() - started < args.limit_s:
                voices = client.voices()
                rss.append(process.memory_info().rss)
                now = time.monotonic() - started
                ready = [v for v in voices if v["state"] == "ready"]
                failed = sum(v["state"] == "failed" for v in voices)
                at = {s: sum(STAGES.index(v.get("stage") or "stock") >= i for v in ready) for i, s in enumerate(STAGES)}
                if len(voices) == args.files:
                    if len(ready) + failed == args.files:
                        reached.setdefault("usable", now)
                    for s in STAGES:
                        if at[s] + failed == args.files:
                            reached.setdefault(s, now)
                if now - last_print >= 15:
                    last_print = now
                    print(f"{now:7.0f} s: {len(voices)} seen, {len(ready)} usable, {failed} failed; "
                          + ", ".join(f"{at[s]} at {s}+" for s in STAGES)
                          + f"; status {status_ms[-1] if status_ms else float('nan'):.1f} ms; RSS {rss[-1] / 2**20:.0f} MiB",
                          flush=True)
                if args.until in reached:
                    break
                time.sleep(1.0)
    finally:
        stop.set()
        asker.join(timeout=30)
        daemon.stop()
    print(f"\n{args.files} files, until {args.until} (refine budget {args.refine_budget_s:g} s):")
    for key in ("usable", *STAGES[:goal + 1]):
        value = reached.get(key)
        print(f"  every voice {key:<8} after {'not within the limit' if value is None else f'{value:.0f} s'}")
    lat = np.asarray(status_ms)
    print(f"  status latency during the drop: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
          f"max {lat.max():.1f} ms (n={len(lat)}, {args.status_hz:g} a second)")
    if slow:
        print("  answers over 50 ms, at (s into the drop, ms): " + ", ".join(f"({t:.0f}, {ms:.0f})" for t, ms in slow[:20]))
    print(f"  daemon RSS: {rss[0] / 2**20:.0f} MiB before the drop, peak {max(rss) / 2**20:.0f}, "
          f"end {rss[-1] / 2**20:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
