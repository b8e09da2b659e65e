"""What the library and the tools need of an artefact store, whatever keeps the artefacts.

Artefacts are keyed by content, never by path: ``(source, producer, kind)``, where ``source``
is the sha256 of the reference recording's bytes, ``producer`` the producing model's id and
version (``"ge2e-resemblyzer@1-abcdef"``) and ``kind`` the stage (``"embedding"``,
``"kokoro/quick"``, ...). An artefact is a few named arrays and a little JSON metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Figures for the daemon's status op; hits and misses count this process's lookups only
    (``get``, ``get_meta`` and ``has`` alike)."""

    entries: int
    bytes: int
    hits: int
    misses: int
    size_limit_bytes: int | None


class Lookups:
    """A store's hits and misses in this process, counted from any thread.

    Every lookup counts, not only ``get``: a voice new to the cache is first looked up through
    ``has`` or ``get_meta``, and a hit rate blind to that read 1.0 on a cache that had nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def read(self) -> tuple[int, int]:
        """(hits, misses), read together."""
        with self._lock:
            return self.hits, self.misses


@runtime_checkable
class ArtifactStore(Protocol):
    """A content-keyed artefact store shared by threads and processes.

    Collection: each user of the store (a daemon's voice library) says which sources it holds
    with ``retain``; content that no holder has held for a grace period goes at
    ``collect_garbage``. Holders are named, so two daemons sharing one store never drop what
    the other still uses.
    """

    def get(self, source: str, producer: str, kind: str) -> dict[str, np.ndarray] | None:
        """The artefact's arrays, or None on a miss (absent, missing or damaged)."""

    def get_entry(self, source: str, producer: str, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The artefact's arrays and metadata ({} if none), or None on a miss."""

    def get_meta(self, source: str, producer: str, kind: str) -> dict[str, Any] | None:
        """The artefact's metadata without its arrays, or None if there is none."""

    def has(self, source: str, producer: str, kind: str) -> bool:
        """Whether the artefact is listed (cheap; ``get`` verifies it)."""

    def put(self, source: str, producer: str, kind: str, arrays: Mapping[str, np.ndarray],
            meta: Mapping[str, Any] | None = None) -> None:
        """Store (or replace) an artefact atomically; CacheError when the store cannot."""

    def evict(self, source: str) -> int:
        """Drop every artefact of one source now; how many."""

    def retain(self, holder: str, live: Iterable[str]) -> None:
        """``holder`` holds exactly the sources ``live`` from now on (its earlier set replaced)."""

    def hold(self, holder: str, sources: Iterable[str]) -> None:
        """``holder`` holds these sources too."""

    def release(self, holder: str, sources: Iterable[str]) -> None:
        """``holder`` no longer holds these sources."""

    def collect_garbage(self, grace_s: float = 0.0) -> int:
        """Drop artefacts of sources no holder has held for ``grace_s``; how many files went."""

    def stats(self) -> StoreStats:
        """Entry count and bytes, this process's hits and misses."""

    def close(self) -> None:
        """Release what the store holds open (idempotent)."""
