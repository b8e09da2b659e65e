"""Crash-safe on-disk cache of per-voice artefacts (speaker embeddings, engine conditioning).

Entries are keyed by CONTENT, never by path: ``(source_sha256, producer, kind)`` where
``source_sha256`` is the hash of the reference recording's bytes, ``producer`` is the
producing model's id and version (``"ge2e-resemblyzer@1-abcdef"``) and ``kind`` names the
stage (``"embedding"``, ``"kokoro/quick"``, ...).

Layout of the cache directory (all directories mode 0o700)::

    index.sqlite            sqlite index (WAL mode): entries, file records, bookkeeping
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

import hashlib
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voiced.errors import CacheError
from voiced.fsutil import fsync_dir, read_npz, sha256_file

__all__ = ["Cache", "CacheStats", "FileRecord", "sha256_file", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

#: Bumped whenever the index schema changes; see ``_MIGRATIONS``.
SCHEMA_VERSION = 1

INDEX_NAME = "index.sqlite"
OBJECTS_DIR = "objects"

#: How long a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT_S = 15.0
#: Temp files younger than this may belong to a put in progress in another process.
TEMP_FILE_MAX_AGE_S = 60.0
#: A hit refreshes the entry's LRU timestamp only if it is older than this (saves a write per get).
ACCESS_TOUCH_INTERVAL_S = 60.0

_OBJECT_NAME_RE = re.compile(r"[0-9a-f]{32}\Z")
_TEMP_PREFIX = "tmp-"
_TEMP_SUFFIX = ".part"
_DIR_MODE = 0o700
# sqlite integers are signed 64-bit; inode numbers are unsigned 64-bit.
_INT64_WRAP = 1 << 64
_INT64_MAX = (1 << 63) - 1
# np.savez takes these as its own parameters, so they cannot name an array.
_RESERVED_ARRAY_NAMES = frozenset({"file", "args", "kwds", "allow_pickle"})

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
CREATE TABLE files (
    path      TEXT    PRIMARY KEY,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    inode     INTEGER NOT NULL,
    sha256    TEXT    NOT NULL,
    last_seen REAL    NOT NULL
) WITHOUT ROWID;
CREATE INDEX files_by_sha256 ON files (sha256);
-- Sources (content hashes) with entries but no file record, and since when.
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
_MIGRATIONS: dict[int, str] = {}


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What the cache remembers about one file of the voices folder."""

    path: str  # relative path below the voices folder, with '/'
    size: int
    mtime_ns: int
    inode: int
    sha256: str


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Figures for the daemon's status op; hits and misses count this process's lookups only
    (``get``, ``get_meta`` and ``has`` alike)."""

    entries: int
    bytes: int
    hits: int
    misses: int
    size_limit_bytes: int | None


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another process does the same on a new index.

    Changing the journal mode needs an exclusive lock, and sqlite answers "database is locked"
    at once, without its busy handler, while another connection holds one. The mode is
    persistent, so this only contends on the first open of a fresh index.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _make_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0o700, or check that it is a directory."""
    try:
        if not path.is_dir():
            path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; make sure nobody else can read voices.
            os.chmod(path, _DIR_MODE)
    except OSError as e:
        raise CacheError(f"cannot create cache directory {path}: {e.strerror or e}") from e


def _serialize(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode arrays as an .npz file in memory; rejects what would need pickle to load."""
    if not arrays:
        raise ValueError("a cache entry needs at least one array")
    clean: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or "/" in name or name in _RESERVED_ARRAY_NAMES:
            raise ValueError(f"invalid array name for the cache: {name!r}")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype {arr.dtype}, which would need pickle")
        clean[name] = arr
    buf = io.BytesIO()
    np.savez(buf, **clean)
    return buf.getvalue()


def _deserialize(data: bytes) -> dict[str, np.ndarray]:
    return read_npz(io.BytesIO(data))


def _is_corruption(exc: BaseException) -> bool:
    """True for sqlite errors that mean the index file itself is damaged (not busy, not I/O)."""
    name = getattr(exc, "sqlite_errorname", None)  # Python >= 3.11
    if name is not None:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    msg = str(exc).lower()
    return "not a database" in msg or "malformed" in msg


def _db_int(value: int) -> int:
    return value - _INT64_WRAP if value > _INT64_MAX else value


class _Corrupt(Exception):
    """Internal: the index was found corrupt while opening."""


class Cache:
    """Content-keyed, crash-safe cache shared by threads and processes; see the module docstring."""

    def __init__(self, directory: str | os.PathLike[str], size_limit_bytes: int | None = None) -> None:
        if size_limit_bytes is not None and size_limit_bytes < 0:
            raise ValueError("size_limit_bytes must be >= 0 or None")
        self.directory = Path(directory)
        self.size_limit_bytes = size_limit_bytes
        self._objects = self.directory / OBJECTS_DIR
        self._index_path = self.directory / INDEX_NAME
        self._local = threading.local()
        # (owning thread, connection): connections of finished threads are closed lazily.
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()  # guards _conns and the counters
        self._hits = 0
        self._misses = 0
        self._closed = False
        # bumped when the connections must be reopened (a read-only cache became writable)
        self._generation = 0
        _make_dir(self.directory)
        _make_dir(self._objects)
        #: Read-only filesystem or folder: entries are served, nothing is stored (puts raise
        #: CacheError) until the folder is writable again, which every write checks.
        self.read_only = not os.access(self.directory, os.W_OK)
        if self.read_only:
            log.warning("cache folder %s is read-only: serving what it holds, storing nothing", self.directory)
        self._open_index()

    # ------------------------------------------------------------------ index plumbing

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        try:
            conn = sqlite3.connect(
                self._index_path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # so that close() can close other threads' connections
            )
        except sqlite3.Error as e:
            raise CacheError(f"cannot open cache index {self._index_path}: {e}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # WAL: readers never block the writer and a kill -9 at any moment leaves a
            # consistent database. synchronous=NORMAL: in WAL mode a commit is not fsynced
            # (only checkpoints are), so a *power loss* may roll back the last few commits
            # but never corrupts the file, and kill -9 loses nothing (the WAL is in the OS
            # page cache). Losing recent commits is harmless here: objects are fsynced
            # before their row commits, so a lost insert leaves an orphan object that
            # garbage collection deletes, and a lost delete leaves a row whose object is
            # gone, which get() detects and removes. FULL would cost an fsync per put for
            # durability this rebuildable cache does not need.
            _set_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        # immutable: no -shm file can be made on a read-only filesystem, and nobody can write
        # there either. Commits still in a -wal file left by a crash are not seen (misses only).
        uri = f"file:{urllib.parse.quote(str(self._index_path))}?mode=ro&immutable=1"
        try:
            return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise CacheError(f"cannot open read-only cache index {self._index_path}: {e}") from e

    def _writable_again(self) -> bool:
        """For a read-only cache: whether its folder can be written now (then reopen read-write)."""
        if not os.access(self.directory, os.W_OK):
            return False
        with self._lock:
            if self.read_only:
                self.read_only = False
                self._generation += 1
                log.info("cache folder %s is writable again", self.directory)
        return True

    def _open_index(self) -> None:
        """Open (creating, migrating or replacing when corrupt) the index."""
        if self.read_only:
            if not self._index_path.exists():
                raise CacheError(f"cache folder {self.directory} is read-only and holds no index")
            conn = self._connect_read_only()
            try:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
            except sqlite3.Error as e:
                conn.close()
                raise CacheError(f"cannot read cache index {self._index_path}: {e}") from e
            if version != SCHEMA_VERSION:
                conn.close()
                raise CacheError(f"read-only cache index {self._index_path} has schema {version}, "
                                 f"expected {SCHEMA_VERSION}")
            self._register(conn)
            return
        for attempt in range(3):
            conn: sqlite3.Connection | None = None
            try:
                conn = self._connect()
                self._ensure_schema(conn)
                row = conn.execute("PRAGMA quick_check").fetchone()
                if row is None or row[0] != "ok":
                    raise _Corrupt(f"quick_check: {row[0] if row else 'no result'}")
            except (sqlite3.DatabaseError, _Corrupt) as e:
                if conn is not None:
                    conn.close()
                if isinstance(e, sqlite3.DatabaseError) and not _is_corruption(e):
                    raise CacheError(f"cannot open cache index {self._index_path}: {e}") from e
                if attempt == 0:
                    # Another process may have just replaced a corrupt index; look again
                    # before moving anything aside.
                    time.sleep(0.05)
                    continue
                self._move_index_aside(e)
                continue
            self._register(conn)
            return
        raise CacheError(f"cannot open cache index {self._index_path}: still corrupt after replacing it")

    def _move_index_aside(self, reason: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        target = self._index_path.with_name(f"{INDEX_NAME}.corrupt-{stamp}")
        log.warning(
            "cache index %s is corrupt (%s); moving it to %s and starting a fresh index "
            "(cached entries will be recomputed)",
            self._index_path, reason, target,
        )
        try:
            os.replace(self._index_path, target)
            # The WAL and shared-memory files belong to the old database; a fresh index must
            # not replay them.
            for suffix in ("-wal", "-shm"):
                side = self._index_path.with_name(INDEX_NAME + suffix)
                if side.exists():
                    os.replace(side, target.with_name(target.name + suffix))
            fsync_dir(self.directory)
        except FileNotFoundError:
            pass  # another process moved it first
        except OSError as e:
            raise CacheError(f"cannot move corrupt cache index {self._index_path} aside: {e.strerror}") from e

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        """Create, migrate or rebuild the schema; under the write lock so processes agree."""
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            while version in _MIGRATIONS and version != SCHEMA_VERSION:
                for stmt in _split_sql(_MIGRATIONS[version]):
                    conn.execute(stmt)
                version += 1
            if version != SCHEMA_VERSION:
                if tables:
                    log.warning(
                        "cache index %s has schema version %d, expected %d; rebuilding it "
                        "(cached entries will be recomputed)",
                        self._index_path, version, SCHEMA_VERSION,
                    )
                for (name, kind) in conn.execute(
                    "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
                    "AND name NOT LIKE 'sqlite_%'"
                ).fetchall():
                    conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
                for stmt in _split_sql(_SCHEMA):
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite connections must not be shared mid-transaction)."""
        if self._closed:
            raise CacheError(f"cache {self.directory} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "generation", 0) != self._generation:
            with self._lock:
                self._conns = [(t, c) for t, c in self._conns if c is not conn]
            conn.close()
            conn = None
        if conn is None:
            try:
                conn = self._connect()
            except sqlite3.Error as e:
                raise CacheError(f"cannot open cache index {self._index_path}: {e}") from e
            self._register(conn)
        return conn

    def _register(self, conn: sqlite3.Connection) -> None:
        """Make ``conn`` this thread's connection; close those of threads that have ended
        (a daemon's worker threads come and go, their connections must not pile up)."""
        self._local.conn = conn
        self._local.generation = self._generation
        with self._lock:
            dead = [c for t, c in self._conns if not t.is_alive()]
            self._conns = [(t, c) for t, c in self._conns if t.is_alive()]
            self._conns.append((threading.current_thread(), conn))
        for c in dead:
            c.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the lock up front (with busy waiting),
        so it can never fail half-way with SQLITE_BUSY when upgrading from a read."""
        if self.read_only and not self._writable_again():
            raise CacheError(f"cache folder {self.directory} is read-only")
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise CacheError(f"cannot lock cache index {self._index_path}: {e}") from e
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback of cache index %s failed", self._index_path)
            if isinstance(e, sqlite3.Error):
                raise CacheError(f"cannot update cache index {self._index_path}: {e}") from e
            raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise CacheError(f"cannot read cache index {self._index_path}: {e}") from e

    # ------------------------------------------------------------------ objects

    def _object_path(self, name: str) -> Path:
        return self._objects / name[:2] / f"{name}.npz"

    def _ensure_subdir(self, sub: Path) -> None:
        # A stat per put (no memo) so that a cache directory wiped while we run is recreated.
        if sub.is_dir():
            return
        _make_dir(self._objects)
        try:
            sub.mkdir(mode=_DIR_MODE, exist_ok=True)
            fsync_dir(self._objects)  # the new directory entry must survive power loss
        except OSError as e:
            raise CacheError(f"cannot create cache directory {sub}: {e.strerror or e}") from e

    def _unlink_objects(self, names: Iterable[str]) -> None:
        """Delete objects whose rows are already gone (committed); failures only leave orphans."""
        for name in names:
            if not _OBJECT_NAME_RE.match(name):
                continue
            path = self._object_path(name)
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another process's garbage collection got there first
            except OSError as e:
                log.warning("cannot delete cache object %s: %s", path, e.strerror)

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
            rows = self._read(
                "SELECT object, object_sha256, last_access, meta FROM entries "
                "WHERE source = ? AND producer = ? AND kind = ?",
                key,
            )
            if not rows:
                break
            name, digest, last_access, meta = rows[0]
            path = self._object_path(name) if _OBJECT_NAME_RE.match(name) else None
            problem: str
            if path is None:
                problem = f"invalid object name {name!r}"
            else:
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    problem = "object file is missing"
                except OSError as e:
                    # Not evidence of corruption (permissions, I/O trouble): keep the row.
                    log.warning("cannot read cache object %s: %s", path, e.strerror)
                    break
                else:
                    if hashlib.sha256(data).hexdigest() != digest:
                        problem = "checksum mismatch"
                    else:
                        try:
                            arrays = _deserialize(data)
                        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
                            problem = f"unreadable npz ({e})"
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
            self._conn().execute(
                "UPDATE entries SET last_access = ? WHERE source = ? AND producer = ? AND kind = ? AND object = ?",
                (now, *key, name),
            )
        except sqlite3.Error as e:
            # Only LRU bookkeeping: never fail a hit because of it.
            log.debug("cannot refresh access time in %s: %s", self._index_path, e)

    def _drop_if_current(self, key: tuple[str, str, str], name: str, problem: str, path: Path | None) -> bool:
        """Remove the entry if it still points at the bad object; False if it changed meanwhile."""
        try:
            with self._write() as conn:
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
                self._unlink_objects([name])
        return dropped

    def get_meta(self, source_sha256: str, producer: str, kind: str) -> dict[str, Any] | None:
        """The metadata stored with the entry ({} if none), or None if there is no entry.

        Reads the index only; the object itself is verified by ``get``.
        """
        rows = self._read(
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
            self._read(
                "SELECT 1 FROM entries WHERE source = ? AND producer = ? AND kind = ?",
                (source_sha256, producer, kind),
            )
        )
        self._count(found)
        return found

    def _count(self, hit: bool) -> None:
        # Every lookup counts, not only ``get``: a voice new to the cache is first looked up
        # through the index, and a hit rate blind to that read 1.0 on a cache that had nothing.
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    def entries_for(self, source_sha256: str) -> list[tuple[str, str]]:
        """All (producer, kind) pairs cached for one content hash."""
        return [
            (p, k)
            for p, k in self._read(
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
        data = _serialize(arrays)
        meta_json = json.dumps(dict(meta), sort_keys=True, allow_nan=False) if meta else None
        digest = hashlib.sha256(data).hexdigest()
        name = secrets.token_hex(16)
        final = self._object_path(name)
        sub = final.parent
        self._ensure_subdir(sub)
        tmp = self._write_temp(sub, data)
        key = (source_sha256, producer, kind)
        to_unlink: list[str] = []
        placed = False
        try:
            with self._write() as conn:
                # Rename under the index's write lock so that a concurrent collect_garbage,
                # which scans for orphans under the same lock, cannot mistake it for one.
                os.replace(tmp, final)
                placed = True
                fsync_dir(sub)  # the object must be durable before its row is
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
                # Start the grace clock for content no file refers to (e.g. `voiced embed FILE`
                # outside the voices folder); INSERT OR IGNORE keeps an earlier start.
                conn.execute(
                    "INSERT OR IGNORE INTO unreferenced (source, since) "
                    "SELECT ?, ? WHERE NOT EXISTS (SELECT 1 FROM files WHERE sha256 = ?)",
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
        self._unlink_objects(to_unlink)

    def _write_temp(self, sub: Path, data: bytes) -> Path:
        """Write ``data`` to a fresh, fsynced temp file in ``sub``; CacheError on failure."""
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=sub)
        except OSError as e:
            raise CacheError(f"cannot create a file in cache directory {sub}: {e.strerror or e}") from e
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            if isinstance(e, OSError):
                raise CacheError(f"cannot write cache object {tmp}: {e.strerror or e}") from e
            raise
        return tmp

    def _evict_to_limit(self, conn: sqlite3.Connection, limit: int, keep: tuple[str, str, str]) -> list[str]:
        """Within a write transaction: delete LRU entries (unreferenced content first) until the
        total is under ``limit``. The entry just written is kept even if alone over the limit."""
        (total,) = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()
        if total <= limit:
            return []
        candidates = conn.execute(
            "SELECT e.source, e.producer, e.kind, e.object, e.size, "
            "EXISTS (SELECT 1 FROM files f WHERE f.sha256 = e.source) AS referenced "
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

    def evict_source(self, source_sha256: str) -> int:
        """Drop every entry of one content hash now; returns how many."""
        with self._write() as conn:
            names = [
                r[0] for r in conn.execute("SELECT object FROM entries WHERE source = ?", (source_sha256,))
            ]
            conn.execute("DELETE FROM entries WHERE source = ?", (source_sha256,))
            conn.execute("DELETE FROM unreferenced WHERE source = ?", (source_sha256,))
        self._unlink_objects(names)
        return len(names)

    # ------------------------------------------------------------------ file records

    def file_records(self) -> dict[str, FileRecord]:
        """Every remembered file of the voices folder, by relative path."""
        rows = self._read("SELECT path, size, mtime_ns, inode, sha256 FROM files")
        return {
            path: FileRecord(path, size, mtime_ns, inode + _INT64_WRAP if inode < 0 else inode, sha)
            for path, size, mtime_ns, inode, sha in rows
        }

    def record_file(self, record: FileRecord) -> None:
        """Remember (or update) one file of the voices folder."""
        self.record_files((record,))

    def record_files(self, records: Iterable[FileRecord]) -> None:
        """Remember many files in one transaction (start-up reconcile of thousands of files)."""
        records = list(records)
        if not records:
            return
        now = time.time()
        rows = [(r.path, r.size, r.mtime_ns, _db_int(r.inode), r.sha256, now) for r in records]
        with self._write() as conn:
            # Content that a changed file no longer has may now be unreferenced. One scan of
            # the table beats thousands of point queries at start-up; few records use lookups.
            old: dict[str, str]
            if len(rows) > 64:
                old = dict(conn.execute("SELECT path, sha256 FROM files").fetchall())
            else:
                old = {}
                for r in records:
                    row = conn.execute("SELECT sha256 FROM files WHERE path = ?", (r.path,)).fetchone()
                    if row is not None:
                        old[r.path] = row[0]
            conn.executemany(
                "INSERT INTO files (path, size, mtime_ns, inode, sha256, last_seen) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "inode = excluded.inode, sha256 = excluded.sha256, last_seen = excluded.last_seen",
                rows,
            )
            new_shas = {r.sha256 for r in records}
            conn.executemany("DELETE FROM unreferenced WHERE source = ?", [(s,) for s in new_shas])
            dropped = {old[r.path] for r in records if r.path in old and old[r.path] != r.sha256} - new_shas
            self._mark_unreferenced(conn, dropped, now)

    def forget_file(self, path: str) -> None:
        """Forget a deleted file; its content's entries become eligible for garbage collection."""
        self.forget_files((path,))

    def forget_files(self, paths: Iterable[str]) -> None:
        """Forget many files in one transaction."""
        paths = list(paths)
        if not paths:
            return
        now = time.time()
        with self._write() as conn:
            shas: set[str] = set()
            for p in paths:
                row = conn.execute("SELECT sha256 FROM files WHERE path = ?", (p,)).fetchone()
                if row is not None:
                    shas.add(row[0])
                    conn.execute("DELETE FROM files WHERE path = ?", (p,))
            self._mark_unreferenced(conn, shas, now)

    @staticmethod
    def _mark_unreferenced(conn: sqlite3.Connection, shas: Iterable[str], now: float) -> None:
        """Start the grace clock for each of ``shas`` that no file record refers to any more."""
        conn.executemany(
            "INSERT OR IGNORE INTO unreferenced (source, since) "
            "SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM files WHERE sha256 = ?1)",
            [(s, now) for s in shas],
        )

    # ------------------------------------------------------------------ maintenance

    def collect_garbage(self, grace_s: float = 0.0, *, temp_max_age_s: float = TEMP_FILE_MAX_AGE_S) -> int:
        """Evict entries whose content no file has referred to for at least ``grace_s`` seconds,
        delete orphan objects (no index row) and stale temp files. Returns how many went.

        The grace period lets a rename/move (delete then create) keep its entries.
        Temp files younger than ``temp_max_age_s`` are kept: another process may be writing.
        """
        now = time.time()
        removed = 0
        with self._write() as conn:
            # Self-healing bookkeeping: content referenced again is no longer unreferenced;
            # content with entries and no file starts its clock now if it had none.
            conn.execute("DELETE FROM unreferenced WHERE source IN (SELECT sha256 FROM files)")
            conn.execute(
                "INSERT OR IGNORE INTO unreferenced (source, since) "
                "SELECT DISTINCT source, ? FROM entries WHERE source NOT IN (SELECT sha256 FROM files)",
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
            removed += self._remove_orphans(known, now, temp_max_age_s)
        if evicted:
            log.info("cache garbage collection evicted %d entries of unreferenced content", len(evicted))
        self._unlink_objects(evicted)
        return removed + len(evicted)

    def _remove_orphans(self, known: set[str], now: float, temp_max_age_s: float) -> int:
        removed = 0
        try:
            subdirs = [d for d in os.scandir(self._objects) if len(d.name) == 2 and d.is_dir(follow_symlinks=False)]
        except OSError as e:
            log.warning("cannot list cache objects in %s: %s", self._objects, e.strerror)
            return 0
        for sub in subdirs:
            try:
                files = list(os.scandir(sub.path))
            except OSError as e:
                log.warning("cannot list cache objects in %s: %s", sub.path, e.strerror)
                continue
            for f in files:
                fname = f.name
                try:
                    if fname.endswith(".npz") and _OBJECT_NAME_RE.match(fname[:-4]):
                        if fname[:-4] in known:
                            continue
                        log.debug("removing orphan cache object %s", f.path)
                    elif fname.startswith(_TEMP_PREFIX) and fname.endswith(_TEMP_SUFFIX):
                        if now - f.stat(follow_symlinks=False).st_mtime < temp_max_age_s:
                            continue
                        log.debug("removing stale cache temp file %s", f.path)
                    else:
                        continue  # not ours: leave it alone
                    os.unlink(f.path)
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.warning("cannot delete cache file %s: %s", f.path, e.strerror)
        return removed

    def stats(self) -> CacheStats:
        """Entry count and bytes (from the index), hits and misses (this process)."""
        rows = self._read("SELECT entries, bytes FROM totals WHERE id = 0")
        entries, nbytes = rows[0] if rows else (0, 0)
        with self._lock:
            hits, misses = self._hits, self._misses
        return CacheStats(entries, nbytes, hits, misses, self.size_limit_bytes)

    def close(self) -> None:
        """Close every connection this object opened (idempotent)."""
        with self._lock:
            self._closed = True
            conns, self._conns = [c for _, c in self._conns], []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error as e:
                log.debug("closing cache index connection: %s", e)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cache({str(self.directory)!r}, size_limit_bytes={self.size_limit_bytes!r})"


def _split_sql(script: str) -> list[str]:
    """Split a schema script into statements; trigger bodies contain ';' so track BEGIN/END."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        current.append(line)
        candidate = "\n".join(current)
        if stripped.endswith(";") and sqlite3.complete_statement(candidate):
            statements.append(candidate)
            current = []
    if current:
        statements.append("\n".join(current))
    return statements
