"""Load: 16 clients at once with mixed requests while files come and go in the voices folder.

Every request gets exactly one reply, with its own id and the right kind of answer (a
synthesis for the voice asked for, a voice list, a status, a pong); the daemon's memory must
not grow by 10% or more between the start of the measurement and its end (each the median of
ten one-second samples, so that one sample taken mid-synthesis cannot decide it). Latency per
operation goes into the summary table.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from voiced.client import Client
from voiced.testing import DaemonProcess

CLIENTS = 16
WARMUP_S = float(os.environ.get("VOICED_LOAD_WARMUP_S", "45"))
LOAD_S = float(os.environ.get("VOICED_LOAD_S", "60"))
REPLY_TIMEOUT_S = 120.0
RSS_WINDOW = 10  # samples (seconds) taken together at each end of the measurement
OPS = ("synthesize", "voices", "status", "ping")
WEIGHTS = (0.1, 0.3, 0.3, 0.3)  # synthesis waits in line behind the others' (2 cores): ask for it less
SPEAKERS = ("allison_a", "carlo_a", "june_a")
# What the clients ask to hear. A fixed set, every one spoken once before the clients start: the
# engine's working memory grows to fit the longest input it has run and is kept for reuse, so
# texts that grew during the run ("... number 9." then "... number 123.") would read as growth
# (+100 MiB over five minutes here) whatever the daemon leaked.
TEXTS = (
    "Hello there.",
    "The train leaves at half past seven.",
    "Please read the second paragraph again, slowly, so that everyone can follow it.",
)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {op: [] for op in OPS}
        self.sent = 0
        self.answered = 0
        self.busy = 0
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def check(op: str, request: dict[str, Any], parts: list[bytes]) -> str | None:
    """Why this reply does not answer this request, or None."""
    header = json.loads(parts[0])
    if header.get("id") != request["id"]:
        return f"reply {header.get('id')} to request {request['id']}"
    if not header.get("ok"):
        return None if header["error"]["code"] == "busy" else f"{op} failed: {header['error']}"
    if op == "synthesize":
        if header.get("voice", {}).get("name") != request["voice"] or len(parts) < 2 or len(parts[1]) < 1000:
            return f"synthesis reply does not match: {header}"
    elif op == "voices" and not isinstance(header.get("voices"), list):
        return f"voices reply without a list: {header}"
    elif op == "status" and "queue" not in header:
        return f"status reply without a queue: {header}"
    elif op == "ping" and header.get("protocol") != 1:
        return f"ping reply: {header}"
    return None


def client_loop(endpoint: str, index: int, stop: threading.Event, measuring: threading.Event, tally: Tally) -> None:
    rng = np.random.default_rng(1000 + index)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            op = str(rng.choice(OPS, p=WEIGHTS))
            request: dict[str, Any] = {"op": op, "id": f"c{index}-{n}"}
            if op == "synthesize":
                request.update(voice=SPEAKERS[int(rng.integers(len(SPEAKERS)))].split("_")[0],
                               text=TEXTS[int(rng.integers(len(TEXTS)))], format="pcm_s16le")
            started = time.perf_counter()
            sock.send(json.dumps(request).encode())
            with tally.lock:
                tally.sent += 1
            if not sock.poll(int(REPLY_TIMEOUT_S * 1000)):
                tally.problem(f"no reply to {request['id']} ({op}) within {REPLY_TIMEOUT_S}s")
                return  # a lost reply: this client stops, the test fails
            parts = sock.recv_multipart()
            elapsed = time.perf_counter() - started
            why = check(op, request, parts)
            with tally.lock:
                tally.answered += 1
                if json.loads(parts[0]).get("error", {}).get("code") == "busy":
                    tally.busy += 1
                elif measuring.is_set():
                    tally.latency[op].append(elapsed)
            if why:
                tally.problem(why)
    finally:
        sock.close(0)


def churn(folder: Path, clip_maker: Any, stop: threading.Event, counts: dict[str, int]) -> None:
    """Add a file, and remove an older one, every 1.5 to 3.5 s."""
    rng = np.random.default_rng(99)
    made: list[Path] = []
    while not stop.wait(float(rng.uniform(1.5, 3.5))):
        counts["added"] += 1
        made.append(clip_maker.write(folder / f"churn-{counts['added']:04d}.wav", rng))
        if len(made) > 5:
            made.pop(0).unlink()
            counts["removed"] += 1


def test_sixteen_clients_mixed_requests_while_files_change(
    tmp_path: Path, testdata_dir: Path, clip_maker: Any, report: Any
) -> None:
    daemon = DaemonProcess(tmp_path, {
        "engine": {"refine_budget_s": 0.0},
        "server": {"queue_size": 32},
        "log": {"level": "warning"},
    })
    for stem in SPEAKERS:
        (daemon.voices / f"{stem.split('_')[0]}.wav").write_bytes((testdata_dir / "voices" / f"{stem}.wav").read_bytes())
    daemon.start()
    for stem in SPEAKERS:
        daemon.wait_ready(stem.split("_")[0])
    with Client(daemon.tcp, timeout_s=REPLY_TIMEOUT_S) as client:
        for text in TEXTS:
            assert len(client.synthesize(text, voice=SPEAKERS[0].split("_")[0], format="pcm_s16le").audio) > 1000
    assert daemon.proc is not None
    process = psutil.Process(daemon.proc.pid)

    tally = Tally()
    stop, measuring = threading.Event(), threading.Event()
    counts = {"added": 0, "removed": 0}
    threads = [threading.Thread(target=client_loop, args=(daemon.tcp, i, stop, measuring, tally)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=churn, args=(daemon.voices, clip_maker, stop, counts)))
    for t in threads:
        t.start()
    try:
        time.sleep(WARMUP_S)
        measuring.set()
        # RSS once a second; start and end are medians over the first and last ten samples,
        # because one sample may land on a synthesis' transient buffers (~100 MiB on its own)
        samples = [process.memory_info().rss]
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline and daemon.alive:
            time.sleep(1.0)
            samples.append(process.memory_info().rss)
        window = max(1, min(RSS_WINDOW, len(samples) // 3))
        rss_start, rss_end = float(np.median(samples[:window])), float(np.median(samples[-window:]))
        rss_peak = max(samples)
    finally:
        stop.set()
        for t in threads:
            t.join(REPLY_TIMEOUT_S + 10)
    alive = daemon.alive
    code = daemon.stop()

    growth = rss_end / rss_start - 1
    lat = {op: np.asarray(v) * 1000 for op, v in tally.latency.items()}
    summary = ", ".join(
        f"{op} p50 {np.percentile(v, 50):.1f} / p99 {np.percentile(v, 99):.0f} ms (n={len(v)})" for op, v in lat.items() if len(v)
    )
    row = report.row("load (16 clients)")
    row.tried += tally.sent
    row.held += tally.answered - len(tally.problems)
    row.lost += tally.sent - tally.answered
    row.notes.append(
        f"{LOAD_S:.0f} s after {WARMUP_S:.0f} s warm-up, {counts['added']} files added and {counts['removed']} removed; "
        f"RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB ({growth:+.1%}, peak {rss_peak / 2**20:.0f}); "
        f"{tally.busy} busy; {summary}"
    )
    assert alive and code == 0, daemon.log_tail()
    assert not tally.problems, tally.problems[:10]
    assert tally.answered == tally.sent
    assert all(len(v) > 0 for v in lat.values()), {op: len(v) for op, v in lat.items()}
    assert growth < 0.10, f"RSS grew {growth:.1%} under load"
