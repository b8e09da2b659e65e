"""A local store in front of a shared one: what a daemon uses when machines share artefacts.

Reads go to the local store first and then to the shared one; a shared hit is copied into the
local store, so the share is read once per machine (read-through). Puts go to the shared store
first, so other machines see an artefact as soon as it exists, then to the local one. Holds and
collection go to both: a deleted file's artefacts leave this machine's cache at once and the
share once no holder anywhere holds them.

The share may be away (a network mount that hangs or fails): then the daemon goes on with its
local store, logging each failure, and nothing is lost but sharing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voiced.errors import CacheError
from voiced.store.base import Lookups, StoreStats
from voiced.store.local import LocalStore
from voiced.store.shared import FolderStore

__all__ = ["TieredStore", "open_store"]

log = logging.getLogger(__name__)


class TieredStore:
    """``local`` as a read-through cache of ``shared``; see the module docstring."""

    def __init__(self, local: LocalStore, shared: FolderStore) -> None:
        self.local, self.shared = local, shared
        self._lookups = Lookups()  # hits anywhere, misses everywhere
        self._from_share = Lookups()  # hits the share answered

    @property
    def directory(self) -> Path:
        """The local store's folder (where the library keeps its own records)."""
        return self.local.directory

    @property
    def size_limit_bytes(self) -> int | None:
        return self.local.size_limit_bytes

    # ------------------------------------------------------------------ entries

    def get(self, source: str, producer: str, kind: str) -> dict[str, np.ndarray] | None:
        entry = self.get_entry(source, producer, kind)
        return None if entry is None else entry[0]

    def get_entry(self, source: str, producer: str, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        entry = self.local.get_entry(source, producer, kind)
        if entry is not None:
            self._lookups.count(True)
            self._share(source, producer, kind, entry)
            return entry
        entry = self.shared.get_entry(source, producer, kind)
        self._lookups.count(entry is not None)
        if entry is not None:
            self._from_share.count(True)
            try:
                self.local.put(source, producer, kind, entry[0], entry[1])
            except CacheError as e:  # a full or read-only local cache: serve from the share
                log.warning("cannot copy a shared artefact into the local cache: %s", e)
        return entry

    def _share(self, source: str, producer: str, kind: str, entry: tuple[dict[str, np.ndarray], dict[str, Any]]) -> None:
        """A local artefact the share lacks (made before the share was configured, or while it
        was away) is shared when it is next read."""
        if self.shared.has(source, producer, kind):
            return
        try:
            self.shared.put(source, producer, kind, entry[0], entry[1])
        except CacheError as e:  # the share is away: every local hit would say so
            log.debug("%s", e)

    def get_meta(self, source: str, producer: str, kind: str) -> dict[str, Any] | None:
        meta = self.local.get_meta(source, producer, kind)
        return meta if meta is not None else self.shared.get_meta(source, producer, kind)

    def has(self, source: str, producer: str, kind: str) -> bool:
        return self.local.has(source, producer, kind) or self.shared.has(source, producer, kind)

    def put(self, source: str, producer: str, kind: str, arrays: Mapping[str, np.ndarray],
            meta: Mapping[str, Any] | None = None) -> None:
        """Into the share and the local store; a CacheError only if neither took it."""
        problem: CacheError | None = None
        try:
            self.shared.put(source, producer, kind, arrays, meta)
        except CacheError as e:
            log.warning("%s (kept in the local cache only)", e)
            problem = e
        try:
            self.local.put(source, producer, kind, arrays, meta)
        except CacheError:
            if problem is not None:
                raise
            log.warning("cannot store an artefact in the local cache (it is in the shared store)", exc_info=True)

    def evict(self, source: str) -> int:
        return max(self.local.evict(source), self.shared.evict(source))

    # ------------------------------------------------------------------ holds

    def _both(self, method: str, *args: Any) -> None:
        getattr(self.local, method)(*args)
        try:
            getattr(self.shared, method)(*args)
        except CacheError as e:
            # the share cannot hear of it now; the next retain (each start, each rescan) tells it
            log.warning("%s", e)

    def hold(self, holder: str, sources: Iterable[str]) -> None:
        self._both("hold", holder, set(sources))

    def release(self, holder: str, sources: Iterable[str]) -> None:
        self._both("release", holder, set(sources))

    def retain(self, holder: str, live: Iterable[str]) -> None:
        self._both("retain", holder, set(live))

    def collect_garbage(self, grace_s: float = 0.0) -> int:
        return self.local.collect_garbage(grace_s) + self.shared.collect_garbage(grace_s)

    def stats(self) -> StoreStats:
        """The local store's entries and bytes; hits anywhere, misses everywhere."""
        local = self.local.stats()
        return StoreStats(local.entries, local.bytes, *self._lookups.read(), local.size_limit_bytes)

    def shared_hits(self) -> int:
        """Lookups this process answered from the share (each copied into the local store)."""
        return self._from_share.read()[0]

    def close(self) -> None:
        self.local.close()
        self.shared.close()

    def __repr__(self) -> str:
        return f"TieredStore({self.local!r}, {self.shared!r})"


def open_store(directory: str | os.PathLike[str], size_limit_bytes: int | None = None,
               shared_dir: str | os.PathLike[str] | None = None) -> LocalStore | TieredStore:
    """The store a configuration asks for: the local one, in front of a shared one if named."""
    local = LocalStore(directory, size_limit_bytes=size_limit_bytes)
    if not shared_dir:
        return local
    try:
        return TieredStore(local, FolderStore(shared_dir))
    except BaseException:
        local.close()
        raise
