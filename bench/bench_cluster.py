"""Cluster mode against the single-machine daemon, in one run: requests/s with 1 and 2
replicas, and what the cluster adds to each request.

    python bench/bench_cluster.py [--seconds 20] [--clients 8] [--sentence-s 0.1]

Starts a real Ray cluster of two nodes on this machine (ray.cluster_utils: a head and a worker,
one CPU each) and, in turn, three daemons on temporary folders holding the same two reference
recordings: one synthesizing itself, one with 1 replica and one with 2. The single daemon and
each replica run ``--per-replica`` requests at once (``synthesis_threads``,
``requests_per_replica``), as an engine serves a bounded batch. Then:

- **overhead**: one client, short requests one at a time, with the ``tone`` engine speaking at
  once (tests/fake_engines); the p50 round trip minus the single daemon's is what the cluster
  adds per request (a hop to the replica and back, through Ray Serve's router);
- **throughput**: ``--clients`` clients for ``--seconds`` each, with the tone engine taking
  ``--sentence-s`` per sentence (it sleeps, as an engine waits on its GPU). A machine with two
  cores cannot show real compute scaling across replicas; this shows that requests spread over
  the replicas and what is left of their capacity after the front door;
- **routing by voice**: 2 replicas that hold one voice each (``voices_per_replica = 1``), the two
  voices asked in turn, one request at a time: the share of requests a replica already holding
  their voice spoke (the tone engine's journal says which process spoke which voice). Sent at
  random, about half would land on the other replica and load the voice again.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from voiced.testing import DaemonProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOICES = ("carlo_a", "june_b")


def daemon(root: Path, address: str | None, replicas: int, sentence_s: float, testdata: Path, per_replica: int,
           **cluster: Any) -> DaemonProcess:
    root.mkdir(parents=True)
    (root / "share").mkdir()
    settings: dict[str, Any] = {
        "engine": {"name": "tone", "options": {"sentence_s": sentence_s, "journal": str(root / "journal")}},
        "plugins": {"paths": [ROOT / "tests" / "fake_engines"]},
        "cache": {"shared_dir": root / "share"},
        "server": {"synthesis_threads": per_replica, "queue_size": 64},
    }
    if address:
        settings["cluster"] = {"address": address, "min_replicas": replicas, "max_replicas": replicas,
                               "num_cpus": 0.5, "requests_per_replica": per_replica, "preparer_num_cpus": 0,
                               "app_name": root.name, **cluster}
    d = DaemonProcess(root, settings)
    d.start(wait=False)
    d.wait_answering(300)
    for name in VOICES:
        shutil.copyfile(testdata / "voices" / f"{name}.wav", d.voices / f"{name}.wav")
    for name in VOICES:
        d.wait_ready(name)
    return d


def round_trips(d: DaemonProcess, n: int) -> list[float]:
    times = []
    with d.client() as client:
        for i in range(n):
            t0 = time.perf_counter()
            client.synthesize("A short reply.", voice=VOICES[i % 2], format="pcm_s16le")
            times.append(time.perf_counter() - t0)
    return times


def routing(d: DaemonProcess, n: int) -> tuple[float, int]:
    """Of ``n`` requests for the two voices in turn: the share spoken by a process that spoke
    the same voice last (the voice was still loaded there), and how many processes spoke."""
    journal = d.root / "journal"
    round_trips(d, 20)  # each voice finds its replica
    time.sleep(2.0)  # the replicas' voices reach Serve's routers
    journal.write_text("")
    round_trips(d, n)
    last: dict[str, str] = {}
    held = 0
    for line in journal.read_text().splitlines():
        pid, pitch = line.split()
        held += last.get(pid) == pitch
        last[pid] = pitch
    return held / max(1, n - len(last)), len(last)  # each process's first request has no last


def throughput(d: DaemonProcess, clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def run(k: int) -> None:
        with d.client(timeout_s=120) as client:
            while time.monotonic() < stop:
                client.synthesize("One sentence. And another.", voice=VOICES[k % 2], format="pcm_s16le")
                done[k] += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="one at a time, for the overhead")
    parser.add_argument("--sentence-s", type=float, default=0.1)
    parser.add_argument("--per-replica", type=int, default=2)
    parser.add_argument("--testdata", type=Path, default=ROOT.parent / "shared" / "testdata")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    print(describe(), flush=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(f"Ray {ray.__version__}: a head and a worker node, one CPU each, on this machine", flush=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, address, replicas in (("single daemon", None, 0), ("cluster, 1 replica", cluster.address, 1),
                                             ("cluster, 2 replicas", cluster.address, 2)):
                for kind, sentence_s in (("overhead", 0.0), ("throughput", args.sentence_s)):
                    root = Path(tmp) / f"{kind}{replicas}"
                    with daemon(root, address, replicas, sentence_s, args.testdata, args.per_replica) as d:
                        if kind == "overhead":
                            round_trips(d, 20)  # warm: each replica has loaded both voices
                            times = sorted(round_trips(d, args.requests))
                            p50, p99 = statistics.median(times), times[int(0.99 * (len(times) - 1))]
                        else:
                            rps = throughput(d, args.clients, args.seconds)
                rows.append((label, p50, p99, rps))
                print(f"{label}: p50 {1000 * p50:.2f} ms, p99 {1000 * p99:.2f} ms one at a time; "
                      f"{rps:.1f} requests/s with {args.clients} clients", flush=True)
            with daemon(Path(tmp) / "routing", cluster.address, 2, 0.0, args.testdata, args.per_replica,
                        voices_per_replica=1) as d:
                share, speakers = routing(d, args.requests)
            print(f"routing by voice: {100 * share:.0f}% of {args.requests} requests (two voices in turn, "
                  f"one at a time) spoken by a replica that held their voice; {speakers} replicas spoke", flush=True)
    finally:
        cluster.shutdown()
    base = rows[0][1]
    per_engine = args.per_replica / (2 * args.sentence_s)  # two sentences a request
    print(f"\nper request, the cluster adds (p50): {', '.join(f'{1000 * (r[1] - base):+.2f} ms ({r[0]})' for r in rows[1:])}")
    print(f"throughput: {', '.join(f'{r[3]:.1f} req/s ({r[0]})' for r in rows)}; one engine's ceiling "
          f"{per_engine:.1f} req/s ({args.per_replica} at once, {2 * args.sentence_s:.2f} s each)")


if __name__ == "__main__":
    main()
