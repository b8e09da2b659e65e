"""One replica of a cluster: a Ray Serve deployment holding a warm engine.

Replicas run on any machine of the Ray cluster. Each builds the daemon's engine from the
daemon's own configuration (the same plugins, options and device rules), loads it once, and
reads prepared voices by their store key from the shared store (with the machine's local store
as its read-through cache), keeping the voices it speaks in memory. Requests name their voice
as Serve's multiplexed model id, so Serve sends them to a replica that already holds it.

The same class, deployed a second time as the preparers, runs the engine's preparation stages:
one voice at a time per replica, streaming the stage's progress back to the front door.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from ray import serve

from voiced.config import Config, parse_config
from voiced.engines.base import Conditioning, EngineError, reports_progress
from voiced.store import open_store

log = logging.getLogger(__name__)

# a key has three parts, none holding this
KEY_SEP = "|"
# a preparing replica says how far it got at least this often, so the front door can call the
# stage off (the file changed, the daemon stops) without waiting for the stage to end
HEARTBEAT_S = 0.5


def voice_id(key: tuple[str, str, str]) -> str:
    """A prepared voice's store key as Serve's multiplexed model id."""
    return KEY_SEP.join(key)


class Replica:
    """What a replica does; ``deployment()`` makes it a Serve deployment with the cluster's settings."""

    def __init__(self, raw_config: Mapping[str, Any], source: str | None, prepares: bool = False) -> None:
        from pathlib import Path

        from voiced.hooks import PluginHost

        self.config: Config = parse_config(raw_config, source=Path(source) if source else None, check_dirs=False)
        self.config.cache.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # this machine's copy of the share, in the folder the config names, within its size limit
        cache = self.config.cache
        self.store = open_store(cache.dir, cache.size_limit_bytes, cache.shared_dir)
        plugins = PluginHost(self.config.plugins, source=self.config.source)
        # synthesis needs no speaker encoder (voices come prepared); an engine's fit may
        encoder = None
        if prepares:
            from voiced.encoder import SpeakerEncoder

            encoder = SpeakerEncoder.from_config(self.config.encoder)
        self.engine = plugins.create_engine(self.config.engine, self.config.cache.dir, encoder)
        self.engine.load(self.config.engine.device)
        self.producer = f"{self.engine.name}@{self.engine.version}"
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        log.info("%s replica %s: engine %s on %s", "preparation" if prepares else "synthesis", self.where, self.producer, getattr(self.engine, "device", "cpu"))

    def info(self) -> dict[str, Any]:
        """What the front door checks before sending work: the same engine, the same rate."""
        return {"producer": self.producer, "sample_rate": self.engine.sample_rate, "where": self.where,
                "device": str(getattr(self.engine, "device", "cpu"))}

    async def voice(self, model_id: str) -> Conditioning:
        """A prepared voice, loaded once per replica (``deployment`` wraps this in Serve's
        multiplexing, which keeps the last few and routes their requests here)."""
        return await self.load_voice(model_id)

    async def load_voice(self, model_id: str) -> Conditioning:
        source, producer, kind = model_id.split(KEY_SEP)
        if producer != self.producer:
            raise EngineError(f"the voice was prepared by {producer}, this replica runs {self.producer}")
        entry = await asyncio.to_thread(self.store.get_entry, source, producer, kind)
        if entry is None:
            raise EngineError(f"prepared voice {source[:12]} ({kind}) is not in the shared store")
        return Conditioning.from_npz(*entry, key=(source, producer, kind))

    async def synthesize(self, text: str, params: Mapping[str, Any],
                         arrays: Mapping[str, np.ndarray] | None = None,
                         meta: Mapping[str, Any] | None = None) -> AsyncIterator[np.ndarray]:
        """The engine's chunks for one request; its voice by the request's multiplexed id, or
        ``arrays`` for a voice the store does not hold."""
        if arrays is not None:
            conditioning = Conditioning(dict(arrays), dict(meta or {}))
        else:
            conditioning = await self.voice(serve.get_multiplexed_model_id())
        chunks = iter(self.engine.synthesize(text, conditioning, dict(params)))
        done = object()
        while True:
            # the engine runs in a thread: the replica's loop stays free for other requests and health checks
            chunk = await asyncio.to_thread(next, chunks, done)
            if chunk is done:
                return
            yield np.asarray(chunk, np.float32)

    async def prepare(self, reference: np.ndarray, embedding: np.ndarray, stage: str, budget_s: float | None,
                      previous: tuple[Mapping[str, np.ndarray], Mapping[str, Any]] | None,
                      stoppable: bool) -> AsyncIterator[dict[str, Any]]:
        """One preparation stage: ``{"progress": x}`` events (x None: still at it), then
        ``{"arrays": ..., "meta": ...}``. Called off (the stream cancelled), the engine is told
        to stop through its ``should_stop``, if the front door's stage could be stopped at all."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[float] = asyncio.Queue()
        called_off = threading.Event()
        extra: dict[str, Any] = {}
        if reports_progress(self.engine):
            extra["progress"] = lambda done: loop.call_soon_threadsafe(events.put_nowait, float(done))
        before = Conditioning(dict(previous[0]), dict(previous[1])) if previous is not None else None

        def run() -> Conditioning:
            return self.engine.prepare_voice(reference, embedding, stage=stage, budget_s=budget_s, previous=before,
                                             should_stop=called_off.is_set if stoppable else None, **extra)

        work = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while not work.done():
                waiting = asyncio.ensure_future(events.get())
                await asyncio.wait({work, waiting}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield {"progress": waiting.result()}
                else:
                    waiting.cancel()
                    if not work.done():
                        yield {"progress": None}
            conditioning = work.result()  # the engine's own error (a bad reference) goes to the front door
            yield {"arrays": {k: np.asarray(v) for k, v in conditioning.items()},
                   "meta": dict(getattr(conditioning, "meta", {}))}
        finally:
            called_off.set()  # cancelled, or done: the engine has nothing more to do


def _actor_options(num_cpus: float, num_gpus: float) -> dict[str, Any]:
    """What Ray reserves for each replica (no GPU key without GPUs: Ray would look for one)."""
    return {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})}


def deployment(cluster: Any) -> Any:
    """The Serve deployment of :class:`Replica` with ``[cluster]``'s settings."""
    options = _actor_options(cluster.num_cpus, cluster.num_gpus)
    scaling: dict[str, Any] = {"num_replicas": cluster.min_replicas}
    if cluster.max_replicas > cluster.min_replicas:
        scaling = {"autoscaling_config": {"min_replicas": cluster.min_replicas, "max_replicas": cluster.max_replicas,
                                          "target_ongoing_requests": cluster.requests_per_replica}}

    class Synthesizer(Replica):
        @serve.multiplexed(max_num_models_per_replica=cluster.voices_per_replica)
        async def voice(self, model_id: str) -> Conditioning:
            return await self.load_voice(model_id)

    return serve.deployment(Synthesizer, name="synthesizer", ray_actor_options=options,
                            max_ongoing_requests=cluster.requests_per_replica, **scaling)


def preparers(cluster: Any) -> Any:
    """The Serve deployment of the preparation replicas. The front door runs one background
    stage at a time on each (a stage keeps every core it is given busy); the second slot lets a
    new file's first stage in at once instead of behind a refinement."""
    options = _actor_options(cluster.preparer_num_cpus, cluster.preparer_num_gpus)
    return serve.deployment(Replica, name="preparer", ray_actor_options=options,
                            num_replicas=cluster.preparers, max_ongoing_requests=2)
