"""Where a cluster request's time goes: the round trip of a bare Ray Serve deployment, as the
front door calls it, without voiced on either side.

    python bench/probe_serve_overhead.py [--requests 100]

One node on this machine, one replica of a deployment whose streaming method yields one small
array at once. Prints the p50/p99 of: a unary call, a streamed call on a kept handle, a streamed
call with a multiplexed model id (as voiced routes by voice), each one at a time from a thread
of the driver, as the daemon's synthesis threads call it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()

    import numpy as np
    import ray
    from ray import serve

    print(describe(), flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4)
    class Bare:
        @serve.multiplexed(max_num_models_per_replica=4)
        async def model(self, model_id: str) -> str:
            return model_id

        async def unary(self, n: int) -> np.ndarray:
            return np.zeros(n, np.float32)

        async def stream(self, n: int) -> Any:
            yield np.zeros(n, np.float32)

        async def stream_voice(self, n: int) -> Any:
            await self.model(serve.get_multiplexed_model_id())
            yield np.zeros(n, np.float32)

    handle = serve.run(Bare.bind(), name="bare", route_prefix=None)
    streaming = handle.options(stream=True)
    voiced = handle.options(stream=True, multiplexed_model_id="voice-a")

    def timed(call: Any) -> tuple[float, float]:
        for _ in range(10):
            call()
        times = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        times.sort()
        return statistics.median(times), times[int(0.99 * (len(times) - 1))]

    cases = {
        "unary": lambda: handle.unary.remote(1600).result(),
        "streamed, kept handle": lambda: list(streaming.stream.remote(1600)),
        "streamed, multiplexed (as voiced)": lambda: list(voiced.stream_voice.remote(1600)),
    }
    for label, call in cases.items():
        p50, p99 = timed(call)
        print(f"{label}: p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms", flush=True)

    # voiced's own replica and front, the tone engine, without the daemon around them
    import tempfile

    from voiced.cluster import ClusterEngine
    from voiced.config import parse_config
    from voiced.engines.base import Conditioning

    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config({"engine": {"name": "tone"},
                               "plugins": {"paths": [str(Path(__file__).resolve().parents[1] / "tests" / "fake_engines")]},
                               "cache": {"dir": f"{tmp}/cache", "shared_dir": tmp},
                               "cluster": {"address": "auto", "num_cpus": 0.5, "preparers": 0, "app_name": "probe"}},
                              check_dirs=False)
        from voiced.hooks import PluginHost

        local = PluginHost(config.plugins).create_engine(config.engine, config.cache.dir, None)
        local.load()
        engine = ClusterEngine(local, config)
        engine.start()
        voice = Conditioning({"pitch": np.array([200.0], np.float32)}, {})
        p50, p99 = timed(lambda: list(engine.synthesize("A short reply.", voice, {})))
        print(f"voiced ClusterEngine.synthesize, tone engine: p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms",
              flush=True)
        engine.stop()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
