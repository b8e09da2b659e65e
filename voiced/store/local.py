"""The local artefact store: a crash-safe folder of per-voice artefacts (speaker embeddings,
engine conditioning), keyed by content (see base.py).

Layout of the cache directory (all directories mode 0o700)::

    index.sqlite            sqlite index (WAL mode): entries, holds, bookkeeping
    objects/ab/<hex>.npz    one object per entry, written with np.savez, never pickled
    objects/ab/tmp-*.part   a put in progress (or a crashed one; collected after a minute)

Invariants that make the cache survive kill -9 and power loss:

* An index row is committed only after its object file was fsynced, atomically renamed
  into place and its directory fsynced, so a row never points at a half-written object.
* Every object name is fresh (random), so a file, once in place, never changes; readers
  verify the sha256 recorded in the index and treat a mismatch as corruption (row removed,
  warning logged, miss returned: the caller recomputes).
* Objects are renamed into place while the index's write lock is held and garbage
  collection scans for orphans under the same lock, so an object without a row seen by the
  collector can only be a crash leftover (or a row just deleted), never a put in flight.
* Objects of deleted or replaced rows are unlinked only after the deleting commit, so a
  crash in between leaves an orphan (collected later) rather than a dangling row.

Several processes (the daemon, CLI invocations) may share one directory: writes use
``BEGIN IMMEDIATE`` with a generous busy timeout; each thread gets its own connection.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voiced.errors import CacheError
from voiced.store import objects as obj
from voiced.store.base import Lookups, StoreStats
from voiced.store.index import SqliteIndex, make_dir

__all__ = ["LocalStore", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

#: Bumped whenever the index schema changes; see ``_MIGRATIONS``.
SCHEMA_VERSION = 2

INDEX_NAME = "index.sqlite"
OBJECTS_DIR = "objects"

#: Temp files younger than this may belong to a put in progress in another process.
TEMP_FILE_MAX_AGE_S = 60.0
#: A hit refreshes the entry's LRU timestamp only if it is older than this (saves a write per get).
ACCESS_TOUCH_INTERVAL_S = 60.0

_HOLDS = """
-- Who refers to which content: a holder is one user of the store (a daemon's voice library).
CREATE TABLE holds (
    holder TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (holder, source)
) WITHOUT ROWID;
CREATE INDEX holds_by_source ON holds (source);
"""

_SCHEMA = """
CREATE TABLE entries (
    source        TEXT    NOT NULL,
    producer      TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    object        TEXT    NOT NULL UNIQUE,
    object_sha256 TEXT    NOT NULL,
    size          INTEGER NOT NULL,
    meta          TEXT,
    created       REAL    NOT NULL,
    last_access   REAL    NOT NULL,
    PRIMARY KEY (source, producer, kind)
);
""" + _HOLDS + """-- Sources (content hashes) with entries that no holder holds, and since when.
CREATE TABLE unreferenced (
    source TEXT PRIMARY KEY,
    since  REAL NOT NULL
) WITHOUT ROWID;
-- Running totals so that the size limit and stats need no scan.
CREATE TABLE totals (
    id      INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes   INTEGER NOT NULL
);
INSERT INTO totals (id, entries, bytes) VALUES (0, 0, 0);
CREATE TRIGGER entries_insert AFTER INSERT ON entries BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER entries_delete AFTER DELETE ON entries BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
CREATE TRIGGER entries_resize AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0;
END;
"""

#: user_version -> SQL that brings it to user_version + 1. Versions without a path are rebuilt
#: (the cache is derived data: dropping it costs recomputation, never correctness).
_MIGRATIONS: dict[int, str] = {
    # The folder's file records moved to the library (library/files.py), which holds what they
    # refer to; until a library says so at its next start, content is unheld: its grace clock
    # starts then, at the first collection, so nothing goes before the library is back.
    1: _HOLDS + """
DROP TABLE files;
DELETE FROM unreferenced;
""",
}


class LocalStore:
    """Content-keyed, crash-safe store in a folder, shared by threads and processes; see the
    module docstring."""

    def __init__(self, directory: str | os.PathLike[str], size_limit_bytes: int | None = None) -> None:
        if size_limit_bytes is not None and size_limit_bytes < 0:
            raise ValueError("size_limit_bytes must be >= 0 or None")
        self.directory = Path(directory)
        self.size_limit_bytes = size_limit_bytes
        self._lookups = Lookups()
        make_dir(self.directory)
        self._objects = obj.ObjectFiles(self.directory / OBJECTS_DIR)
        if not os.access(self.directory, os.W_OK):
            log.warning("cache folder %s is read-only: serving what it holds, storing nothing", self.directory)
        self._index = SqliteIndex(self.directory, INDEX_NAME, _SCHEMA, SCHEMA_VERSION, _MIGRATIONS)

    @property
    def read_only(self) -> bool:
        """Entries are served, nothing is stored (puts raise CacheError) until the folder is
        writable again, which every write checks."""
        return self._index.read_only

    # ------------------------------------------------------------------ entries

    def get(self, source_sha256: str, producer: str, kind: str) -> dict[str, np.ndarray] | None:
        """Return the entry's arrays, or None on a miss (absent, missing or corrupt object)."""
        entry = self.get_entry(source_sha256, producer, kind)
        return None if entry is None else entry[0]

    def get_entry(
        self, source_sha256: str, producer: str, kind: str
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The entry's arrays and its metadata ({} if none) from one index read, or None on a miss."""
        key = (source_sha256, producer, kind)
        for _ in range(3):
            rows = self._index.read(
                "SELECT object, object_sha256, last_access, meta FROM entries "
                "WHERE source = ? AND producer = ? AND kind = ?",
                key,
            )
            if not rows:
                break
            name, digest, last_access, meta = rows[0]
            path = self._objects.path(name)
            try:
                arrays = self._objects.read(name, digest)
            except FileNotFoundError:
                problem = "object file is missing"
            except obj.BadObject as e:
                problem = str(e)
            except OSError as e:
                # Not evidence of corruption (permissions, I/O trouble): keep the row.
                log.warning("cannot read cache object %s: %s", path, e.strerror)
                break
            else:
                self._touch(key, name, last_access)
                self._count(True)
                return arrays, json.loads(meta) if meta else {}
            if self._drop_if_current(key, name, problem, path):
                break
            # The row changed between our read and the failure (a concurrent put replaced
            # or evicted it and deleted the old object): look again.
        self._count(False)
        return None

    def _touch(self, key: tuple[str, str, str], name: str, last_access: float) -> None:
        now = time.time()
        if now - last_access < ACCESS_TOUCH_INTERVAL_S:
            return
        try:
            # A single autocommit statement: takes the write lock directly (busy handler applies).
            self._index.conn().execute(
                "UPDATE entries SET last_access = ? WHERE source = ? AND producer = ? AND kind = ? AND object = ?",
                (now, *key, name),
            )
        except sqlite3.Error as e:
            # Only LRU bookkeeping: never fail a hit because of it.
            log.debug("cannot refresh access time in %s: %s", self._index.path, e)

    def _drop_if_current(self, key: tuple[str, str, str], name: str, problem: str, path: Path | None) -> bool:
        """Remove the entry if it still points at the bad object; False if it changed meanwhile."""
        try:
            with self._index.write() as conn:
                cur = conn.execute(
                    "DELETE FROM entries WHERE source = ? AND producer = ? AND kind = ? AND object = ?",
                    (*key, name),
                )
                dropped = cur.rowcount > 0
        except CacheError as e:
            # read-only (or failing) index: the bad entry stays listed, and reads as a miss
            log.warning("cache entry %s/%s/%s is bad (%s, %s) and cannot be dropped: %s",
                        key[0][:12], key[1], key[2], problem, path, e)
            return True
        if dropped:
            log.warning(
                "cache entry %s/%s/%s dropped: %s (%s); it will be recomputed",
                key[0][:12], key[1], key[2], problem, path,
            )
            if path is not None:
                self._objects.unlink([name])
        return dropped

    def get_meta(self, source_sha256: str, producer: str, kind: str) -> dict[str, Any] | None:
        """The metadata stored with the entry ({} if none), or None if there is no entry.

        Reads the index only; the object itself is verified by ``get``.
        """
        rows = self._index.read(
            "SELECT meta FROM entries WHERE source = ? AND producer = ? AND kind = ?",
            (source_sha256, producer, kind),
        )
        self._count(bool(rows))
        if not rows:
            return None
        return json.loads(rows[0][0]) if rows[0][0] else {}

    def has(self, source_sha256: str, producer: str, kind: str) -> bool:
        """Whether the index has the entry (cheap; does not verify the object, ``get`` does)."""
        found = bool(
            self._index.read(
                "SELECT 1 FROM entries WHERE source = ? AND producer = ? AND kind = ?",
                (source_sha256, producer, kind),
            )
        )
        self._count(found)
        return found

    def _count(self, hit: bool) -> None:
        self._lookups.count(hit)

    def entries_for(self, source_sha256: str) -> list[tuple[str, str]]:
        """All (producer, kind) pairs cached for one content hash."""
        return [
            (p, k)
            for p, k in self._index.read(
                "SELECT producer, kind FROM entries WHERE source = ? ORDER BY producer, kind",
                (source_sha256,),
            )
        ]

    def put(
        self,
        source_sha256: str,
        producer: str,
        kind: str,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Store (or replace) an entry atomically; on error the previous state is intact.

        Raises ValueError/TypeError for arrays or meta the cache cannot store, CacheError
        for filesystem or index failures.
        """
        data = obj.serialize(arrays)
        meta_json = json.dumps(dict(meta), sort_keys=True, allow_nan=False) if meta else None
        digest = obj.digest(data)
        name = obj.new_name()
        final = self._objects.path(name)
        tmp = self._objects.write_temp(name, data)
        key = (source_sha256, producer, kind)
        to_unlink: list[str] = []
        placed = False
        try:
            with self._index.write() as conn:
                # Rename under the index's write lock so that a concurrent collect_garbage,
                # which scans for orphans under the same lock, cannot mistake it for one.
                self._objects.place(tmp, name)  # durable before its row is
                placed = True
                now = time.time()
                old = conn.execute(
                    "SELECT object FROM entries WHERE source = ? AND producer = ? AND kind = ?", key
                ).fetchone()
                if old is not None:
                    conn.execute("DELETE FROM entries WHERE source = ? AND producer = ? AND kind = ?", key)
                    to_unlink.append(old[0])
                conn.execute(
                    "INSERT INTO entries (source, producer, kind, object, object_sha256, size, meta, created, last_access) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*key, name, digest, len(data), meta_json, now, now),
                )
                # Start the grace clock for content nobody holds (e.g. `voiced embed FILE`
                # outside the voices folder); INSERT OR IGNORE keeps an earlier start.
                conn.execute(
                    "INSERT OR IGNORE INTO unreferenced (source, since) "
                    "SELECT ?, ? WHERE NOT EXISTS (SELECT 1 FROM holds WHERE source = ?)",
                    (source_sha256, now, source_sha256),
                )
                if self.size_limit_bytes is not None:
                    to_unlink += self._evict_to_limit(conn, self.size_limit_bytes, keep=key)
        except BaseException as e:
            leftover = final if placed else tmp
            try:
                leftover.unlink()
            except OSError:
                pass  # collect_garbage will remove it
            if isinstance(e, OSError):
                raise CacheError(f"cannot store cache object {final}: {e.strerror or e}") from e
            raise
        self._objects.unlink(to_unlink)

    def _evict_to_limit(self, conn: sqlite3.Connection, limit: int, keep: tuple[str, str, str]) -> list[str]:
        """Within a write transaction: delete LRU entries (unreferenced content first) until the
        total is under ``limit``. The entry just written is kept even if alone over the limit."""
        (total,) = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()
        if total <= limit:
            return []
        candidates = conn.execute(
            "SELECT e.source, e.producer, e.kind, e.object, e.size, "
            "EXISTS (SELECT 1 FROM holds h WHERE h.source = e.source) AS referenced "
            "FROM entries e ORDER BY referenced, e.last_access"
        ).fetchall()
        removed: list[str] = []
        for source, producer, kind, name, size, _ in candidates:
            if total <= limit:
                break
            if (source, producer, kind) == keep:
                continue
            conn.execute(
                "DELETE FROM entries WHERE source = ? AND producer = ? AND kind = ?", (source, producer, kind)
            )
            removed.append(name)
            total -= size
        if removed:
            log.info("cache over its %d-byte limit: evicted %d least recently used entries", limit, len(removed))
        return removed

    def evict(self, source_sha256: str) -> int:
        """Drop every entry of one content hash now; returns how many. Its holds stay."""
        with self._index.write() as conn:
            names = [
                r[0] for r in conn.execute("SELECT object FROM entries WHERE source = ?", (source_sha256,))
            ]
            conn.execute("DELETE FROM entries WHERE source = ?", (source_sha256,))
            conn.execute("DELETE FROM unreferenced WHERE source = ?", (source_sha256,))
        self._objects.unlink(names)
        return len(names)

    # ------------------------------------------------------------------ holds

    def hold(self, holder: str, sources: Iterable[str]) -> None:
        """``holder`` refers to ``sources``: their entries are kept (and evicted last)."""
        rows = [(holder, s) for s in set(sources)]
        if not rows:
            return
        with self._index.write() as conn:
            conn.executemany("INSERT OR IGNORE INTO holds (holder, source) VALUES (?, ?)", rows)
            conn.executemany("DELETE FROM unreferenced WHERE source = ?", [(s,) for _, s in rows])

    def release(self, holder: str, sources: Iterable[str]) -> None:
        """``holder`` no longer refers to ``sources``; content no holder refers to any more
        starts its grace clock (collected by ``collect_garbage`` once it has run out)."""
        sources = set(sources)
        if not sources:
            return
        with self._index.write() as conn:
            conn.executemany("DELETE FROM holds WHERE holder = ? AND source = ?", [(holder, s) for s in sources])
            self._mark_unreferenced(conn, sources, time.time())

    def retain(self, holder: str, live: Iterable[str]) -> None:
        """``holder`` refers to exactly ``live`` from now on: what it held besides is released."""
        live = set(live)
        with self._index.write() as conn:
            held = {r[0] for r in conn.execute("SELECT source FROM holds WHERE holder = ?", (holder,))}
            conn.executemany("INSERT OR IGNORE INTO holds (holder, source) VALUES (?, ?)",
                             [(holder, s) for s in live - held])
            conn.executemany("DELETE FROM unreferenced WHERE source = ?", [(s,) for s in live - held])
            gone = held - live
            conn.executemany("DELETE FROM holds WHERE holder = ? AND source = ?", [(holder, s) for s in gone])
            self._mark_unreferenced(conn, gone, time.time())

    def holders(self, source_sha256: str) -> list[str]:
        """Who holds one content hash."""
        return [r[0] for r in self._index.read("SELECT holder FROM holds WHERE source = ? ORDER BY holder",
                                               (source_sha256,))]

    @staticmethod
    def _mark_unreferenced(conn: sqlite3.Connection, shas: Iterable[str], now: float) -> None:
        """Start the grace clock for each of ``shas`` that no holder refers to any more."""
        conn.executemany(
            "INSERT OR IGNORE INTO unreferenced (source, since) "
            "SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM holds WHERE source = ?1)",
            [(s, now) for s in shas],
        )

    # ------------------------------------------------------------------ maintenance

    def collect_garbage(self, grace_s: float = 0.0, *, temp_max_age_s: float = TEMP_FILE_MAX_AGE_S) -> int:
        """Evict entries whose content no holder has referred to for at least ``grace_s`` seconds,
        delete orphan objects (no index row) and stale temp files. Returns how many went.

        The grace period lets a rename/move (delete then create) keep its entries.
        Temp files younger than ``temp_max_age_s`` are kept: another process may be writing.
        """
        now = time.time()
        removed = 0
        with self._index.write() as conn:
            # Self-healing bookkeeping: content held again is no longer unreferenced;
            # content with entries and no holder starts its clock now if it had none.
            conn.execute("DELETE FROM unreferenced WHERE source IN (SELECT source FROM holds)")
            conn.execute(
                "INSERT OR IGNORE INTO unreferenced (source, since) "
                "SELECT DISTINCT source, ? FROM entries WHERE source NOT IN (SELECT source FROM holds)",
                (now,),
            )
            expired = conn.execute(
                "SELECT e.object FROM entries e JOIN unreferenced u ON u.source = e.source WHERE u.since <= ?",
                (now - grace_s,),
            ).fetchall()
            evicted = [r[0] for r in expired]
            conn.execute(
                "DELETE FROM entries WHERE source IN (SELECT source FROM unreferenced WHERE since <= ?)",
                (now - grace_s,),
            )
            conn.execute("DELETE FROM unreferenced WHERE source NOT IN (SELECT source FROM entries)")
            # Orphan scan under the write lock: puts rename objects into place under this lock
            # too, so an unreferenced object here is a crash leftover, never a put in flight.
            # Evicted objects are unlinked after the commit (a crash before it must not leave
            # rows without objects), so they are not orphans yet.
            known = {r[0] for r in conn.execute("SELECT object FROM entries")}
            known.update(evicted)
            removed += self._objects.remove_orphans(known, now, temp_max_age_s)
        if evicted:
            log.info("cache garbage collection evicted %d entries of unreferenced content", len(evicted))
        self._objects.unlink(evicted)
        return removed + len(evicted)

    def stats(self) -> StoreStats:
        """Entry count and bytes (from the index), hits and misses (this process)."""
        rows = self._index.read("SELECT entries, bytes FROM totals WHERE id = 0")
        entries, nbytes = rows[0] if rows else (0, 0)
        hits, misses = self._lookups.read()
        return StoreStats(entries, nbytes, hits, misses, self.size_limit_bytes)

    def close(self) -> None:
        """Close every connection this object opened (idempotent)."""
        self._index.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.directory)!r}, size_limit_bytes={self.size_limit_bytes!r})"
