"""Crash safety: SIGKILL the daemon at random moments while it prepares a folder of voices.

Between rounds files are added, changed, renamed and deleted while the daemon is down, as
happens when a machine loses power and someone tidies the folder before it comes back. After
the last restart every file must be ready (or failed with a reason, for the broken ones), and
the cache must hold no corrupt, stale or orphaned entry: checked straight from its index and
object files, with the daemon stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachecheck import cache_problems

from voiced.fsutil import sha256_file
from voiced.testing import DaemonProcess

SEED = int(os.environ.get("VOICED_CRASH_SEED", "20261125"))
ROUNDS = int(os.environ.get("VOICED_CRASH_ROUNDS", "20"))
FILES = 50
BROKEN = ("broken-noise.wav", "broken-text.flac", "broken-short.wav")
SETTLE_TIMEOUT_S = 600.0


def write_broken(folder: Path, rng: np.random.Generator) -> None:
    (folder / BROKEN[0]).write_bytes(rng.bytes(40_000))  # not audio at all
    (folder / BROKEN[1]).write_text("this is a text file with an audio extension\n")
    import soundfile as sf

    sf.write(folder / BROKEN[2], np.zeros(4000, np.float32), 16000)  # 0.25 s: under min_duration_s


def mutate(folder: Path, rng: np.random.Generator, clip_maker: Any, counter: list[int]) -> list[str]:
    """Add, change, rename and delete a few good files while the daemon is down."""
    done = []
    good = sorted(p for p in folder.glob("v*.wav"))
    for _ in range(int(rng.integers(1, 4))):
        action = rng.choice(["add", "change", "rename", "delete"])
        if action == "add" or len(good) < 10:
            counter[0] += 1
            clip_maker.write(folder / f"v{counter[0]:03d}.wav", rng)
        elif action == "change":
            target = good[int(rng.integers(len(good)))]
            clip_maker.write(target, rng)
        elif action == "rename":
            target = good.pop(int(rng.integers(len(good))))
            counter[0] += 1
            target.rename(folder / f"v{counter[0]:03d}.wav")
        else:
            good.pop(int(rng.integers(len(good)))).unlink()
        done.append(str(action))
    return done


@pytest.mark.timeout(SETTLE_TIMEOUT_S + 1200)  # 20 rounds of start-up, then the settle time, on a machine of any speed
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, clip_maker: Any, report: Any) -> None:
    rng = np.random.default_rng(SEED)
    daemon = DaemonProcess(tmp_path, {
        "voices": {"rescan_interval_s": 30.0},
        "engine": {"refine_budget_s": 0.5},
        "log": {"level": "info"},
    })
    folder = daemon.voices
    counter = [0]
    for _ in range(FILES - len(BROKEN)):
        counter[0] += 1
        clip_maker.write(folder / f"v{counter[0]:03d}.wav", rng)
    write_broken(folder, rng)

    kills_after_answering = kills_mid_preparation = 0
    mutations: list[str] = []
    for _ in range(ROUNDS):
        # a quarter of the kills land during start-up, the rest while voices are being prepared
        during_startup = rng.random() < 0.25
        delay = float(rng.uniform(0.2, 3.0) if during_startup else rng.uniform(0.0, 8.0))
        if during_startup:
            daemon.start(wait=False)
        else:
            daemon.start()
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            time.sleep(0.02)
            assert daemon.alive, f"the daemon died on its own:\n{daemon.log_tail()}"
        if not during_startup:
            kills_after_answering += 1
            with daemon.client(timeout_s=10) as client:
                states = [v["state"] for v in client.voices()]
            if "pending" in states or "preparing" in states:
                kills_mid_preparation += 1
        assert daemon.kill() == -9
        mutations += mutate(folder, rng, clip_maker, counter)

    # the final start: everything settles
    daemon.start()
    expected = {p.stem: p for p in folder.iterdir() if p.suffix in (".wav", ".flac")}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    with daemon.client() as client:
        while True:
            voices = {v["name"]: v for v in client.voices()}
            settled = set(voices) == set(expected) and all(v["state"] in ("ready", "failed") for v in voices.values())
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert settled, f"not settled: {sorted(set(expected) ^ set(voices))} " + str(
            [v for v in voices.values() if v["state"] not in ("ready", "failed")][:5])
        some = next(name for name, v in voices.items() if v["state"] == "ready")
        assert len(client.synthesize("Still here after all that.", voice=some, format="wav").audio) > 1000
    assert daemon.stop() == 0

    current = {sha256_file(p) for p in expected.values()}
    lost = []
    for name, path in expected.items():
        v = voices[name]
        assert v["sha256"] == sha256_file(path), f"{name}: the daemon holds an old hash"
        if path.name in BROKEN:
            assert v["state"] == "failed" and v.get("error"), v
        elif v["state"] != "ready":
            lost.append(f"{name}: {v}")
    problems = cache_problems(daemon.cache_dir, current)
    row = report.row("crash safety (SIGKILL)")
    row.tried += ROUNDS
    row.held += ROUNDS if not lost and not any(problems.values()) else 0
    row.lost += len(lost) + sum(len(v) for v in problems.values())
    row.notes.append(
        f"{ROUNDS} kills ({kills_after_answering} while serving, {kills_mid_preparation} mid-preparation), {len(mutations)} file changes while down, "
        f"{len(expected)} files checked, seed {SEED}"
    )
    assert not lost, lost
    assert not any(problems.values()), problems
