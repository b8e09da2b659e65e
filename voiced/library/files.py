"""What the library remembers of its folder's files, and which content it holds in the store.

A record is a file's size, mtime and inode with the sha256 of its bytes, so that a restart
re-hashes only what changed. Records are kept per holder (this library's host and folder), in
``files.sqlite`` beside the store's index, and the store is told which content each holder
refers to (``hold``/``release``, and ``retain`` to make it exact): two daemons sharing one
store keep their own records and never release what the other still uses.

The records and the store's holds are two databases, so their updates are not one
transaction: new content is held before its record is written and old content released after,
so a crash in between leaves content held too long (until the next ``sync``), never a record
whose content the store may collect.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from voiced.errors import CacheError
from voiced.store import ArtifactStore
from voiced.store.index import SqliteIndex, db_int, from_db_int, make_dir

log = logging.getLogger(__name__)
NAME = "files.sqlite"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE files (
    holder    TEXT    NOT NULL,
    path      TEXT    NOT NULL,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    inode     INTEGER NOT NULL,
    sha256    TEXT    NOT NULL,
    last_seen REAL    NOT NULL,
    PRIMARY KEY (holder, path)
) WITHOUT ROWID;
CREATE INDEX files_by_sha256 ON files (holder, sha256);
"""


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What the library remembers about one file of the voices folder."""

    path: str  # relative path below the voices folder, with '/'
    size: int
    mtime_ns: int
    inode: int
    sha256: str


def holder_name(folder: Path) -> str:
    """This library's name among the store's holders: the host and the folder's real path."""
    return f"{socket.gethostname()}:{Path(folder).resolve()}"


class FileRecords:
    """The records of one holder's files, and that holder's holds in ``store``."""

    def __init__(self, directory: Path, holder: str, store: ArtifactStore) -> None:
        self.directory, self.holder, self.store = Path(directory), holder, store
        make_dir(self.directory)
        self._db = SqliteIndex(self.directory, NAME, _SCHEMA, SCHEMA_VERSION)
        # one change at a time: a sync that read the records before a new one was written
        # would otherwise release the new content's hold right after it was taken
        self._lock = threading.Lock()
        self._kept: dict[str, FileRecord] = {}  # records the database refused, by path, for ``retry``

    def all(self) -> dict[str, FileRecord]:
        """Every remembered file of the folder, by relative path."""
        rows = self._db.read("SELECT path, size, mtime_ns, inode, sha256 FROM files WHERE holder = ?", (self.holder,))
        return {path: FileRecord(path, size, mtime_ns, from_db_int(inode), sha)
                for path, size, mtime_ns, inode, sha in rows}

    def record(self, records: Iterable[FileRecord]) -> None:
        """Remember (or update) files, in one transaction (a start-up reconcile of thousands)."""
        records = list(records)
        if not records:
            return
        now = time.time()
        rows = [(self.holder, r.path, r.size, r.mtime_ns, db_int(r.inode), r.sha256, now) for r in records]
        with self._lock:
            self.store.hold(self.holder, {r.sha256 for r in records})
            with self._db.write() as conn:
                old = self._shas_of(conn, [r.path for r in records])
                conn.executemany(
                    "INSERT INTO files (holder, path, size, mtime_ns, inode, sha256, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (holder, path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                    "inode = excluded.inode, sha256 = excluded.sha256, last_seen = excluded.last_seen",
                    rows,
                )
                dropped = self._unreferenced(conn, set(old.values()) - {r.sha256 for r in records})
            if dropped:
                self.store.release(self.holder, dropped)

    def record_or_keep(self, records: Iterable[FileRecord]) -> bool:
        """``record``; when the database refuses (full, read-only), keep the records in memory for
        ``retry`` and say so in the log. Whether they are recorded now."""
        records = list(records)
        try:
            self.record(records)
        except CacheError as exc:
            log.warning("cannot record %s in the file records: %s",
                        records[0].path if len(records) == 1 else f"{len(records)} files", exc)
            with self._lock:
                self._kept.update((r.path, r) for r in records)
            return False
        with self._lock:
            for r in records:
                if self._kept.get(r.path) == r:
                    del self._kept[r.path]
        return True

    def retry(self, valid: Callable[[FileRecord], bool]) -> bool:
        """Record what the database refused earlier, of it what is still ``valid`` (the file still
        has that content). Whether nothing is left kept."""
        with self._lock:
            kept = list(self._kept.values())
            self._kept.clear()
        kept = [r for r in kept if valid(r)]
        if not kept:
            return True
        try:
            self.record(kept)
        except CacheError as exc:
            log.debug("still cannot record files: %s", exc)
            with self._lock:
                for r in kept:
                    self._kept.setdefault(r.path, r)
            return False
        return True

    def forget(self, paths: Iterable[str]) -> None:
        """Forget deleted files; content no other of them has is released in the store."""
        paths = list(paths)
        if not paths:
            return
        with self._lock:
            with self._db.write() as conn:
                old = self._shas_of(conn, paths)
                conn.executemany("DELETE FROM files WHERE holder = ? AND path = ?", [(self.holder, p) for p in old])
                dropped = self._unreferenced(conn, set(old.values()))
            if dropped:
                self.store.release(self.holder, dropped)

    def sync(self) -> None:
        """Make the store's holds for this holder exactly the content of its records (after a
        crash between the two, or on a store that never had them)."""
        with self._lock:
            self.store.retain(self.holder, {r[0] for r in self._db.read(
                "SELECT DISTINCT sha256 FROM files WHERE holder = ?", (self.holder,))})

    def _shas_of(self, conn: sqlite3.Connection, paths: list[str]) -> dict[str, str]:
        # One scan of the holder's rows beats thousands of point queries at start-up.
        if len(paths) > 64:
            wanted = set(paths)
            return {p: s for p, s in conn.execute("SELECT path, sha256 FROM files WHERE holder = ?", (self.holder,))
                    if p in wanted}
        out = {}
        for p in paths:
            row = conn.execute("SELECT sha256 FROM files WHERE holder = ? AND path = ?", (self.holder, p)).fetchone()
            if row is not None:
                out[p] = row[0]
        return out

    def _unreferenced(self, conn: sqlite3.Connection, shas: set[str]) -> set[str]:
        return {s for s in shas if conn.execute("SELECT 1 FROM files WHERE holder = ? AND sha256 = ? LIMIT 1",
                                                (self.holder, s)).fetchone() is None}

    def close(self) -> None:
        self._db.close()
