"""Per-request overhead of each front door against a ZeroMQ request, in one run.

    python bench/bench_doors.py [--requests 200] [--engine tone|kokoro]

Starts the real daemon with both door plugins (``openai_http``, ``wyoming``) on a temporary
folder holding one reference recording, then sends the same short synthesis request through
each door in turn (round robin, so every door sees the same machine), one at a time:

- ZeroMQ: ``voiced.client.Client`` over tcp, ``pcm_s16le``;
- OpenAI HTTP: the official ``openai`` client, ``response_format = "pcm"`` (one kept-alive
  connection), and a bare ``http.client`` POST on a kept-alive connection;
- Wyoming: the ``wyoming`` library's client, a new connection per request as Home Assistant
  makes, ``synthesize`` to ``audio-stop``.

With the default ``tone`` engine (tests/fake_engines: a tone per request, no model) synthesis
costs nearly nothing, so a round trip is the door's cost plus the daemon's; a door's overhead is
its median round trip minus ZeroMQ's. ``--engine kokoro`` shows the same against real speech.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import openai
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize, SynthesizeVoice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from voiced.testing import DaemonProcess, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = "A short reply."


def wyoming_request(port: int, voice: str) -> int:
    async def run() -> int:
        size = 0
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=voice)).event())
            while True:
                event = await client.read_event()
                if event is None or event.type in ("audio-stop", "error"):
                    assert event is not None and event.type == "audio-stop", event
                    return size
                size += len(event.payload or b"")

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--engine", choices=("tone", "kokoro"), default="tone")
    parser.add_argument("--testdata", type=Path, default=ROOT.parent / "shared" / "testdata")
    args = parser.parse_args()

    http_port, wy_port = free_port(), free_port()
    engine = {"name": "tone"} if args.engine == "tone" else {"refine_budget_s": 0}
    with tempfile.TemporaryDirectory() as tmp:
        d = DaemonProcess(Path(tmp), {
            "engine": engine,
            "plugins": {"enabled": ["openai_http", "wyoming"], "paths": [ROOT / "tests" / "fake_engines"]},
            "plugins.openai_http": {"listen": f"127.0.0.1:{http_port}"},
            "plugins.wyoming": {"listen": f"tcp://127.0.0.1:{wy_port}"},
        })
        with d.start():
            shutil.copyfile(args.testdata / "voices" / "carlo_a.wav", d.voices / "carlo.wav")
            d.wait_ready("carlo", stage="ready" if args.engine == "tone" else "refined")  # its final voice
            zmq_client = d.client()
            oa = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0)
            conn = http.client.HTTPConnection("127.0.0.1", http_port)
            body = json.dumps({"model": "tts-1", "voice": "carlo", "input": TEXT, "response_format": "pcm"})

            def raw_http() -> int:
                conn.request("POST", "/v1/audio/speech", body, {"Content-Type": "application/json"})
                reply = conn.getresponse()
                data = reply.read()
                assert reply.status == 200, data
                return len(data)

            doors: dict[str, Callable[[], int]] = {
                "zeromq (voiced.client)": lambda: len(zmq_client.synthesize(TEXT, voice="carlo", format="pcm_s16le",
                                                                            sample_rate=24000).audio),
                "openai http (openai client)": lambda: len(oa.audio.speech.create(
                    model="tts-1", voice="carlo", input=TEXT, response_format="pcm").content),
                "openai http (http.client)": raw_http,
                # at the engine's rate: 16 kHz for tone, where the others ask for 24 kHz
                "wyoming (new connection)": lambda: wyoming_request(wy_port, "carlo"),
            }
            sizes = {name: call() for name, call in doors.items()}  # warm every path once
            for _ in range(5):
                for call in doors.values():
                    call()
            times: dict[str, list[float]] = {name: [] for name in doors}
            for _ in range(args.requests):
                for name, call in doors.items():
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
            zmq_client.close()
            conn.close()

    print(describe())
    print(f"engine: {args.engine}; {args.requests} requests per door, one at a time, round robin; "
          f"text {TEXT!r}")
    def quantile(samples: list[float], q: float) -> float:
        ms = sorted(t * 1000 for t in samples)
        return ms[min(len(ms) - 1, int(q * len(ms)))]

    base = quantile(times["zeromq (voiced.client)"], 0.5)
    print(f"{'door':<30} {'bytes':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'over zeromq p50':>16}")
    for name, samples in times.items():
        p50, p90, p99 = (quantile(samples, q) for q in (0.5, 0.9, 0.99))
        print(f"{name:<30} {sizes[name]:>7} {p50:>8.2f} {p90:>8.2f} {p99:>8.2f} {p50 - base:>+15.2f}")


if __name__ == "__main__":
    main()
