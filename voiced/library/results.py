"""Prepared results between the preparation worker and the store.

Write-behind: a result is published (readable here at once) before it is stored, so a voice is
usable without waiting for the store's fsyncs, and one the store refuses (full, read-only) stays
in memory, keeping its voice usable, until ``retry`` gets it stored. The hot set keeps the
conditionings being spoken in memory: reading and verifying a style pack from disk costs
milliseconds, which every request would otherwise pay.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from voiced.engines.base import Conditioning
from voiced.errors import CacheError
from voiced.library.registry import Cached
from voiced.store import ArtifactStore

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (source sha256, producer, kind), as the store keys artefacts
Result = tuple[str, str, Mapping[str, np.ndarray], Mapping[str, Any]]  # (kind, producer, arrays, meta)
NOT_CACHED = "not cached"  # how a voice's note begins while a result of it is held only in memory


class Results:
    """The library's view of its prepared results: memory first, then the store."""

    def __init__(self, store: ArtifactStore, hot_voices: int = 64) -> None:
        self.store = store
        self.hot_voices = hot_voices
        self._lock = threading.Lock()
        self._hot: OrderedDict[Key, Conditioning] = OrderedDict()
        # published but not yet stored (or not storable: the store full or read-only)
        self._unsaved: dict[Key, tuple[Mapping[str, np.ndarray], Mapping[str, Any]]] = {}
        self._unstorable: set[Key] = set()  # of those, the ones whose put failed

    def publish(self, sha: str, results: Iterable[Result]) -> None:
        """Make results readable now; ``store`` them next."""
        with self._lock:
            for kind, producer, arrays, meta in results:
                self._unsaved[(sha, producer, kind)] = (arrays, meta)

    def store_published(self, sha: str, results: Iterable[Result]) -> str | None:
        """Store results in the store; a full or read-only store costs a recomputation later,
        nothing now (what it refused stays in memory). A note for the voice when something
        could not be stored, else None."""
        problem = None
        for kind, producer, arrays, meta in results:
            key = (sha, producer, kind)
            try:
                self.store.put(sha, producer, kind, arrays, meta)
            except CacheError as exc:
                log.error("cannot cache %s for %s: %s", kind, sha[:12], exc)
                problem = f"{NOT_CACHED} ({exc})"
                with self._lock:
                    self._unstorable.add(key)
                continue
            with self._lock:
                self._unsaved.pop(key, None)
                self._unstorable.discard(key)
        return problem

    def retry(self, present: set[str]) -> tuple[int, set[str]]:
        """Store what the store refused earlier: (how many are stored now, the content hashes
        with nothing left unstored). Results of content not in ``present`` (no voice has it any
        more) are dropped from memory instead."""
        with self._lock:
            keys = sorted(self._unstorable)
        stored = 0
        done: set[str] = set()
        for key in keys:
            with self._lock:
                item = self._unsaved.get(key)
                if item is None or key[0] not in present:
                    self._unsaved.pop(key, None)
                    self._unstorable.discard(key)
                    continue
            try:
                self.store.put(*key, item[0], item[1])
            except CacheError as exc:
                log.debug("still cannot cache %s for %s: %s", key[2], key[0][:12], exc)
                break  # the store is still refusing: try again next time
            stored += 1
            with self._lock:
                self._unsaved.pop(key, None)
                self._unstorable.discard(key)
                if not any(k[0] == key[0] for k in self._unstorable):
                    done.add(key[0])
        return stored, done

    def arrays(self, key: Key) -> Mapping[str, np.ndarray] | None:
        with self._lock:
            unsaved = self._unsaved.get(key)
        if unsaved is not None:
            return unsaved[0]
        return self.store.get(*key)

    def meta(self, key: Key) -> Mapping[str, Any] | None:
        """The result's metadata (None if there is no such result), without reading its arrays."""
        with self._lock:
            unsaved = self._unsaved.get(key)
        return unsaved[1] if unsaved is not None else self.store.get_meta(*key)

    def has(self, key: Key) -> bool:
        with self._lock:
            if key in self._unsaved:
                return True
        return self.store.has(*key)

    def conditioning(self, key: Key) -> Conditioning | None:
        with self._lock:
            unsaved = self._unsaved.get(key)
            hot = self._hot.get(key)
            if hot is not None:
                self._hot.move_to_end(key)
                return hot
        if unsaved is not None:
            return Conditioning.from_npz(unsaved[0], unsaved[1])
        entry = self.store.get_entry(*key)
        if entry is None:
            return None
        conditioning = Conditioning.from_npz(*entry, key=key)
        with self._lock:
            self._hot[key] = conditioning
            while len(self._hot) > self.hot_voices:
                self._hot.popitem(last=False)
        return conditioning


class Prepared:
    """A content's prepared results under their keys: the speaker embedding (keyed by the
    encoder and how it was computed), then each engine stage (keyed by the engine)."""

    def __init__(self, results: Results, encoder: str, embedding_kind: str,
                 engine: str | None, stages: Sequence[str]) -> None:
        self.results = results
        self.encoder, self.embedding_kind = encoder, embedding_kind
        self.engine, self.stages = engine, tuple(stages)

    def embedding_key(self, sha: str) -> Key:
        return (sha, self.encoder, self.embedding_kind)

    def stage_key(self, sha: str, stage: str) -> Key:
        return (sha, self.engine or "", stage)

    def embedding(self, sha: str) -> np.ndarray | None:
        arrays = self.results.arrays(self.embedding_key(sha))
        return None if arrays is None else arrays["embedding"]

    def conditioning(self, sha: str, stage: str) -> Conditioning | None:
        return self.results.conditioning(self.stage_key(sha, stage))

    def cached(self, sha: str) -> Cached | None:
        """What is there for ``sha`` to make its voice ready without preparing: the embedding
        and, with an engine, at least its first stage (the furthest one reached counts)."""
        meta = self.results.meta(self.embedding_key(sha))
        if meta is None:
            return None
        stage = None
        for candidate in self.stages:
            if self.results.has(self.stage_key(sha, candidate)):
                stage = candidate
        if self.stages and stage is None:
            return None
        return Cached(stage, meta)
