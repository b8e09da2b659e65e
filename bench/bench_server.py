"""Daemon benchmarks over a real socket: per-request overhead, throughput, time to first audio.

    python bench/bench_server.py [--requests 200] [--transport tcp|ipc]

Starts the real daemon (`voiced serve`) on a temporary folder holding one reference recording,
then measures, in one run:
(1) the daemon's per-request overhead beyond engine compute: client round trip of a short
    synthesis minus the engine time the reply header reports (`engine_s`), against a bare pyzmq
    REQ/REP echo round trip on the same transport (target p50 <= 0.5 ms, p99 <= 2 ms); and the
    round trip of `ping`, which never touches the model. A second floor: the smallest server
    that does the same work, one thread in its own process that receives on a ROUTER, runs the
    same engine on the same text and sends the same number of bytes back. Its overhead is what
    the machine charges any server whose reply follows a few hundred milliseconds of compute
    (threads asleep that long wake slowly, notably in virtual machines); the daemon's own cost
    is the difference;
(2) synthesis throughput with 1, 4 and 16 concurrent clients;
(3) time to first audio with streaming, against the whole reply, for a three-sentence text.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from voiced.client import Client
from voiced.testing import DaemonProcess, free_port

TESTDATA = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).resolve().parents[2] / "shared" / "testdata")
SHORT = "Yes."
THREE = "The first sentence is short. The second one is a little longer than that. And here is the third."


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000


def bare_reqrep(endpoint: str, n: int, reply_bytes: int) -> list[float]:
    """A REP thread and a REQ client: the floor any ZeroMQ request/reply carrying this many bytes pays."""
    ctx = zmq.Context.instance()
    rep = ctx.socket(zmq.REP)
    rep.bind(endpoint)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if rep.poll(100):
                rep.recv()
                rep.send_multipart([b'{"id": "1", "ok": true}', body])

    body = bytes(reply_bytes)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    req = ctx.socket(zmq.REQ)
    req.connect(endpoint)
    payload = b'{"op": "ping", "id": "1"}'
    times = []
    for _ in range(n + 20):
        t = time.perf_counter()
        req.send(payload)
        req.recv_multipart()
        times.append(time.perf_counter() - t)
    stop.set()
    thread.join()
    req.close(0)
    rep.close(0)
    return times[20:]


def _engine_server(endpoint: str, models_dir: str, reply_bytes: int) -> None:
    """The bare floor's server process: ROUTER, engine, reply; nothing else."""
    from voiced.engines.kokoro import KokoroEngine

    engine = KokoroEngine(models_dir)
    engine.load("cpu")
    conditioning = engine.default_conditioning()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(endpoint)
    while True:
        parts = router.recv_multipart()
        if parts[-1] == b"stop":
            break
        started = time.monotonic()
        audio = np.concatenate(list(engine.synthesize(SHORT, conditioning, {})))
        engine_s = time.monotonic() - started
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        body = pcm[:reply_bytes].ljust(reply_bytes, b"\0")  # the daemon's voice speaks longer
        router.send_multipart(parts[:-1] + [json.dumps({"ok": True, "engine_s": engine_s}).encode(), body])
    router.close(0)


def bare_engine(endpoint: str, models_dir: Path, n: int, reply_bytes: int) -> tuple[list[float], list[float]]:
    """Round trips minus engine time against the bare engine server, and its engine times."""
    process = multiprocessing.get_context("spawn").Process(
        target=_engine_server, args=(endpoint, str(models_dir), reply_bytes), daemon=True)
    process.start()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    overheads, engine = [], []
    try:
        for i in range(n + 2):
            t = time.perf_counter()
            dealer.send(b'{"op": "synthesize"}')
            if not dealer.poll(300_000):
                raise RuntimeError("the bare engine server did not answer")
            header, _ = dealer.recv_multipart()
            total = time.perf_counter() - t
            engine_s = json.loads(header)["engine_s"]
            if i >= 2:  # the first answers include loading the model
                overheads.append(total - engine_s)
                engine.append(engine_s)
        dealer.send(b"stop")
        process.join(30)
    finally:
        dealer.close(0)
        if process.is_alive():
            process.kill()
    return overheads, engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    parser.add_argument("--overhead-only", action="store_true", help="measure (1) only")
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="voiced-bench-server-"))
    endpoint = f"tcp://127.0.0.1:{free_port()}" if args.transport == "tcp" else f"ipc://{work}/voiced.sock"
    bare_endpoint = f"tcp://127.0.0.1:{free_port()}" if args.transport == "tcp" else f"ipc://{work}/bare.sock"
    daemon = DaemonProcess(work, {
        "engine": {"refine_budget_s": 0.0},
        "server": {"endpoints": [endpoint], "queue_size": 64},
        "log": {"level": "warning"},
    })
    shutil.copyfile(TESTDATA / "voices" / "allison_a.wav", daemon.voices / "allison.wav")
    daemon.start()
    try:
        with Client(endpoint, timeout_s=300) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    reply = client.synthesize(SHORT, voice="allison", wait_s=120, format="pcm_s16le")
                    break
                except Exception:
                    if time.monotonic() > deadline or not daemon.alive:
                        print(daemon.log_tail(), file=sys.stderr)
                        raise
                    time.sleep(0.5)
            print(f"voiced server bench: {os.cpu_count()} CPUs, {args.transport}, voice stage "
                  f"{reply.header['voice'].get('stage')}, model {client.status()['model']}")

            # (1) overhead
            bare = bare_reqrep(bare_endpoint, args.requests, len(reply.audio))
            pings = []
            for _ in range(args.requests):
                t = time.perf_counter()
                client.ping()
                pings.append(time.perf_counter() - t)
            overheads, engine, inside = [], [], []
            for _ in range(args.requests):
                t = time.perf_counter()
                reply = client.synthesize(SHORT, voice="allison", format="pcm_s16le")
                total = time.perf_counter() - t
                engine.append(reply.header["engine_s"])
                inside.append(reply.header["total_s"] - reply.header["engine_s"])
                overheads.append(total - reply.header["engine_s"])
        floor, floor_engine = bare_engine(
            f"tcp://127.0.0.1:{free_port()}" if args.transport == "tcp" else f"ipc://{work}/floor.sock",
            daemon.cache_dir / "models", args.requests, len(reply.audio))
        b50, o50, f50 = pct(bare, 50), pct(overheads, 50), pct(floor, 50)
        print(f"(1) per-request cost, {args.requests} requests each; replies of {len(reply.audio)} bytes")
        print(f"    bare pyzmq REQ/REP        p50 {b50:6.3f} ms   p99 {pct(bare, 99):6.3f} ms")
        print(f"    ping                      p50 {pct(pings, 50):6.3f} ms   p99 {pct(pings, 99):6.3f} ms   ({pct(pings, 50) / b50:.1f}x bare)")
        print(f"    synthesize minus engine   p50 {o50:6.3f} ms   p99 {pct(overheads, 99):6.3f} ms   ({o50 / b50:.1f}x bare; "
              f"target p50 <= 0.5 ms, p99 <= 2 ms)")
        print(f"    of which inside daemon    p50 {pct(inside, 50):6.3f} ms   p99 {pct(inside, 99):6.3f} ms   (receipt to reply sent, minus engine)")
        print(f"    (engine time of '{SHORT}'  p50 {pct(engine, 50):6.1f} ms)")
        print(f"    bare engine server        p50 {f50:6.3f} ms   p99 {pct(floor, 99):6.3f} ms   (one thread, own process, "
              f"same engine and reply size; engine p50 {pct(floor_engine, 50):.1f} ms)")
        print(f"    daemon's own cost         p50 {o50 - f50:6.3f} ms   (synthesize minus engine, minus the bare engine server)")

        if args.overhead_only:
            return 0

        # (2) throughput
        print("(2) throughput, short synthesis requests")
        for clients in (1, 4, 16):
            per_client = max(4, 48 // clients)
            errors: list[str] = []

            def run() -> None:
                with Client(endpoint, timeout_s=300) as c:
                    for i in range(per_client):
                        try:
                            c.synthesize(f"Number {i}.", voice="allison", format="pcm_s16le")
                        except Exception as exc:
                            errors.append(str(exc))

            threads = [threading.Thread(target=run) for _ in range(clients)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            elapsed = time.perf_counter() - t
            done = clients * per_client - len(errors)
            print(f"    {clients:2d} clients   {done / elapsed:6.1f} requests/s   ({done} in {elapsed:.1f} s, {len(errors)} errors)")

        # (3) time to first audio
        with Client(endpoint, timeout_s=300) as client:
            firsts, wholes = [], []
            for _ in range(5):
                t = time.perf_counter()
                first = None
                for chunk in client.stream(THREE, voice="allison"):
                    if first is None:
                        first = time.perf_counter() - t
                firsts.append(first or 0.0)
                t = time.perf_counter()
                client.synthesize(THREE, voice="allison", format="pcm_s16le")
                wholes.append(time.perf_counter() - t)
        print("(3) three-sentence text")
        print(f"    first streamed chunk      p50 {pct(firsts, 50):7.1f} ms")
        print(f"    whole reply               p50 {pct(wholes, 50):7.1f} ms")
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
