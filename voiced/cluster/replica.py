"""One synthesis replica of a cluster: a Ray Serve deployment holding a warm engine.

Replicas run on any machine of the Ray cluster. Each builds the daemon's engine from the
daemon's own configuration (the same plugins, options and device rules), loads it once, and
reads prepared voices by their store key from the shared store (with the machine's local store
as its read-through cache), keeping the voices it speaks in memory. Requests name their voice
as Serve's multiplexed model id, so Serve sends them to a replica that already holds it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
from ray import serve

from voiced.config import Config, parse_config
from voiced.engines.base import Conditioning, EngineError
from voiced.store import open_store

log = logging.getLogger(__name__)

# a key has three parts, none holding this
KEY_SEP = "|"


def voice_id(key: tuple[str, str, str]) -> str:
    """A prepared voice's store key as Serve's multiplexed model id."""
    return KEY_SEP.join(key)


class Replica:
    """What a replica does; ``deployment()`` makes it a Serve deployment with the cluster's settings."""

    def __init__(self, raw_config: Mapping[str, Any], source: str | None) -> None:
        from pathlib import Path

        from voiced.hooks import PluginHost

        self.config: Config = parse_config(raw_config, source=Path(source) if source else None, check_dirs=False)
        self.config.cache.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # this machine's copy of the share, in the folder the config names, within its size limit
        limit = int(self.config.cache.size_limit_mb * 2**20) or None
        self.store = open_store(self.config.cache.dir, limit, self.config.cache.shared_dir)
        plugins = PluginHost(self.config.plugins, source=self.config.source)
        # synthesis needs no speaker encoder: voices come prepared
        self.engine = plugins.create_engine(self.config.engine, self.config.cache.dir, None)
        self.engine.load(self.config.engine.device)
        self.producer = f"{self.engine.name}@{self.engine.version}"
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        log.info("synthesis replica %s: engine %s on %s", self.where, self.producer, getattr(self.engine, "device", "cpu"))

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


def deployment(cluster: Any) -> Any:
    """The Serve deployment of :class:`Replica` with ``[cluster]``'s settings."""
    options: dict[str, Any] = {"num_cpus": cluster.num_cpus}
    if cluster.num_gpus:
        options["num_gpus"] = cluster.num_gpus
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
