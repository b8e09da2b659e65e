"""Cluster mode with the real engine, as a user would try it: Kokoro in a synthesis replica and
a preparation replica, against the same daemon without a cluster, on the same recording.

    python bench/probe_cluster_kokoro.py [--voice june_a] [--refine-budget-s 5]

Starts a one-node Ray cluster on this machine (one replica of each kind) and two daemons in
turn: one on the cluster, one alone. Each prepares the voice to its last stage and speaks the
same sentence. Prints the time each took to reach each stage, the synthesis round trip, and
whether the two replies are the same audio (preparation and synthesis are deterministic, so a
voice prepared on a replica must speak as one prepared at home).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from voiced.testing import DaemonProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The cluster speaks in the voice it was given."


def run(root: Path, address: str | None, voice: Path, budget: float) -> tuple[dict[str, float], float, bytes]:
    root.mkdir(parents=True)
    (root / "share").mkdir()
    settings: dict[str, Any] = {"engine": {"refine_budget_s": budget}, "cache": {"shared_dir": root / "share"}}
    if address:
        settings["cluster"] = {"address": address, "num_cpus": 0.5, "preparer_num_cpus": 0.5, "app_name": root.name}
    with DaemonProcess(root, settings).start(wait=False) as d:
        d.wait_answering(600)
        started = time.monotonic()
        shutil.copyfile(voice, d.voices / voice.name)
        name = voice.stem
        reached: dict[str, float] = {}
        stages = ("stock", "quick", "refined")
        for i, stage in enumerate(stages):
            d.wait_voice(name, lambda v: v is not None and v["state"] == "ready" and v.get("stage") in stages[i:], 1800)
            reached[stage] = time.monotonic() - started
        with d.client(timeout_s=300) as client:
            client.synthesize("Warm up.", voice=name, format="pcm_s16le")
            t0 = time.monotonic()
            audio = client.synthesize(TEXT, voice=name, format="pcm_s16le").audio
            took = time.monotonic() - t0
    return reached, took, audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voice", default="june_a")
    parser.add_argument("--refine-budget-s", type=float, default=5.0)
    parser.add_argument("--testdata", type=Path, default=ROOT.parent / "shared" / "testdata")
    args = parser.parse_args()

    import ray

    print(describe(), flush=True)
    voice = args.testdata / "voices" / f"{args.voice}.wav"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, where in (("cluster", address), ("alone", None)):
                reached, took, audio = run(Path(tmp) / label, where, voice, args.refine_budget_s)
                results[label] = audio
                print(f"{label}: ready (stock) after {reached['stock']:.1f} s, quick after {reached['quick']:.1f} s, "
                      f"refined after {reached['refined']:.1f} s; "
                      f"'{TEXT}' in {1000 * took:.0f} ms, {len(audio) // 2 / 24000:.2f} s of audio", flush=True)
    finally:
        ray.shutdown()
    same = results["cluster"] == results["alone"]
    print(f"the cluster's reply {'is' if same else 'is NOT'} the same audio as the daemon's alone")


if __name__ == "__main__":
    main()
