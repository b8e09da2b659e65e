"""The daemon as a cluster's front door: it keeps its folder, voice library, protocol and
plugins, and sends synthesis to replicas on a Ray cluster (see replica.py).

Voices are embedded here; the engine's preparation stages run on preparation replicas (or here,
with ``preparers = 0``) and land in the shared store; a request names its voice by store key,
and Serve routes it to a replica that holds that voice (or else to the least loaded one).

A replica that dies mid-request costs a retry, not the request: the request runs again on
another replica and the chunks already sent are skipped (the engine says the same text in the
same voice the same way), so a streamed reply continues where it stopped. A stage whose
preparation replica dies runs again from its start on another.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from voiced.config import Config, to_dict
from voiced.engines.base import Conditioning, Engine, reports_progress
from voiced.errors import ConfigError, VoicedError

log = logging.getLogger(__name__)

INFO_TIMEOUT_S = 600.0
HANDLES_KEPT = 1024  # replicas load their engine before the first answer


class ClusterError(RuntimeError):
    """The cluster could not finish a request: the daemon's failure, not the client's (``internal``)."""


class ClusterEngine:
    """An engine whose synthesis and preparation run on the cluster's replicas; everything else
    (its stages, the stock voice) is the local engine's, reached through attribute lookup."""

    def __init__(self, local: Engine, config: Config) -> None:
        self.local, self.config, self.cluster = local, config, config.cluster
        self.handle: Any = None
        self.preparing: Any = None  # the preparers' handle; None: voices are prepared here
        # a handle made by options() starts slowly (about 85 ms on its first call): one per voice, kept
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._handles_lock = threading.Lock()
        self.retried = 0  # requests that outlived a replica
        self.lost = 0  # requests no try could finish
        self.stages_retried = 0  # preparation stages that outlived a replica
        self.stages_lost = 0

    def __getattr__(self, name: str) -> Any:
        if name == "local":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.local, name)

    @property
    def sample_rate(self) -> int:
        return self.local.sample_rate

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Join the cluster, deploy the replicas and wait until one answers."""
        try:
            import ray
            from ray import serve
        except ImportError:
            raise ConfigError("[cluster] address: cluster mode needs Ray Serve: pip install 'voiced[cluster]'") from None
        from voiced.cluster.replica import deployment, preparers

        log.info("joining the Ray cluster at %s", self.cluster.address)
        try:
            ray.init(address=self.cluster.address, namespace="voiced", log_to_driver=False,
                     logging_level=logging.WARNING, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"[cluster] address: cannot join the Ray cluster at {self.cluster.address}: {exc}") from None
        serve.start(proxy_location="Disabled")
        source = str(self.config.source) if self.config.source else None
        raw = to_dict(self.config)
        self.handle = serve.run(deployment(self.cluster).bind(raw, source), name=self.cluster.app_name,
                                route_prefix=None)
        self._check(self.handle)
        if self.cluster.preparers:
            preparing = serve.run(preparers(self.cluster).bind(raw, source, True), name=self.prepare_app,
                                  route_prefix=None)
            self._check(preparing)
            self.preparing = preparing.options(stream=True)  # made once: a new handle starts slowly
        log.info("cluster ready: application %r, replicas %d-%d, preparers %d", self.cluster.app_name,
                 self.cluster.min_replicas, self.cluster.max_replicas, self.cluster.preparers)

    @property
    def prepare_app(self) -> str:
        return f"{self.cluster.app_name}-prepare"

    def _check(self, handle: Any) -> None:
        """The replicas must run this daemon's engine and version: their voices and audio are its."""
        info = handle.info.remote().result(timeout_s=INFO_TIMEOUT_S)
        producer = f"{self.local.name}@{self.local.version}"
        if info["producer"] != producer or info["sample_rate"] != self.local.sample_rate:
            raise ConfigError(f"[cluster] the replicas run {info['producer']} at {info['sample_rate']} Hz, "
                              f"this daemon {producer} at {self.local.sample_rate} Hz: install the same version everywhere")
        log.info("replica %s runs %s on %s", info["where"], info["producer"], info["device"])

    def stop(self) -> None:
        """Take the replicas down (their GPUs are free again) and leave the cluster."""
        import ray
        from ray import serve

        for app in (self.cluster.app_name, self.prepare_app):
            try:
                serve.delete(app)
            except Exception as exc:  # a cluster already gone has nothing to take down
                log.warning("cannot remove the Serve application %r: %s", app, exc)
        ray.shutdown()

    # ------------------------------------------------------------------ synthesis

    def _streaming(self, model_id: str) -> Any:
        """The streaming handle for one voice (``""``: no voice to route by), made once."""
        with self._handles_lock:
            handle = self._handles.get(model_id)
            if handle is None:
                handle = self._handles[model_id] = self.handle.options(stream=True, multiplexed_model_id=model_id)
                while len(self._handles) > HANDLES_KEPT:
                    self._handles.popitem(last=False)
            self._handles.move_to_end(model_id)
            return handle

    def synthesize(self, text: str, conditioning: Any, params: Mapping[str, Any]) -> Iterator[np.ndarray]:
        from ray.exceptions import RayError, RayTaskError

        from voiced.cluster.replica import voice_id

        key = getattr(conditioning, "key", None)
        delivered = 0
        problem: Exception | None = None
        for attempt in range(self.cluster.retries + 1):
            if key is not None:  # by key: Serve routes it to a replica holding the voice
                chunks = self._streaming(voice_id(key)).synthesize.remote(text, dict(params))
            else:  # prepared but not stored (a full cache): the arrays go along
                chunks = self._streaming("").synthesize.remote(
                    text, dict(params), dict(conditioning), dict(getattr(conditioning, "meta", {})))
            try:
                for i, chunk in enumerate(chunks):
                    if i >= delivered:
                        delivered += 1
                        yield chunk
                if attempt:
                    self.retried += 1
                return
            except VoicedError:
                raise  # the engine's own answer (bad text, a bad parameter): the same on any replica
            except RayTaskError as exc:
                raise ClusterError(f"synthesis failed on a replica: {exc.cause!r}") from None
            except RayError as exc:
                problem = exc
                log.warning("a synthesis replica was lost mid-request (try %d of %d, %d chunks sent): %s",
                            attempt + 1, self.cluster.retries + 1, delivered, type(exc).__name__)
        self.lost += 1
        raise ClusterError(f"the cluster lost this request {self.cluster.retries + 1} times "
                           f"(replicas died mid-request): {problem}")

    # ------------------------------------------------------------------ preparation

    def prepare_voice(self, reference: np.ndarray, embedding: np.ndarray, *, stage: str, budget_s: float | None = None,
                      previous: Conditioning | None = None, should_stop: Callable[[], bool] | None = None,
                      progress: Callable[[float], None] | None = None) -> Conditioning:
        """One stage on a preparation replica; called off when ``should_stop`` says so."""
        if self.preparing is None:
            extra = {"progress": progress} if progress is not None and reports_progress(self.local) else {}
            return self.local.prepare_voice(reference, embedding, stage=stage, budget_s=budget_s, previous=previous,
                                            should_stop=should_stop, **extra)
        from ray.exceptions import RayError, RayTaskError

        before = (dict(previous), dict(getattr(previous, "meta", {}))) if previous is not None else None
        problem: Exception | None = None
        for attempt in range(self.cluster.retries + 1):
            events = self.preparing.prepare.remote(
                np.asarray(reference, np.float32), np.asarray(embedding, np.float32), stage, budget_s, before,
                should_stop is not None)
            try:
                for event in events:
                    # this daemon's should_stop may pause here while its own requests wait: the
                    # replica goes on meanwhile, and its events wait in the stream
                    if should_stop is not None and should_stop():
                        events.cancel()
                        return previous if previous is not None else Conditioning({}, {})
                    if "arrays" in event:
                        if attempt:
                            self.stages_retried += 1
                        return Conditioning(event["arrays"], event["meta"])
                    if progress is not None and event["progress"] is not None:
                        progress(event["progress"])
                raise ClusterError(f"the preparation replica ended stage {stage} without a result")
            except VoicedError as exc:  # the engine's own answer (a bad reference): the same anywhere
                raise getattr(exc, "cause", exc) from None
            except RayTaskError as exc:
                raise ClusterError(f"stage {stage} failed on a replica: {exc.cause!r}") from None
            except RayError as exc:
                problem = exc
                log.warning("a preparation replica was lost mid-stage %s (try %d of %d): %s", stage,
                            attempt + 1, self.cluster.retries + 1, type(exc).__name__)
        self.stages_lost += 1
        raise ClusterError(f"the cluster lost stage {stage} {self.cluster.retries + 1} times: {problem}")

    def summary(self) -> dict[str, Any]:
        return {"address": self.cluster.address, "app": self.cluster.app_name,
                "replicas": [self.cluster.min_replicas, self.cluster.max_replicas],
                "retried": self.retried, "lost": self.lost, "preparers": self.cluster.preparers,
                "stages_retried": self.stages_retried, "stages_lost": self.stages_lost}
