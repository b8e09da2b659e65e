"""An sqlite database that many threads and processes share, and that survives kill -9.

What the store's index and the library's file records both need: one connection per thread,
WAL, write transactions that take the lock up front, a schema created or migrated under that
lock, a damaged file moved aside and replaced, and a read-only folder served as it is.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from voiced.errors import CacheError
from voiced.fsutil import fsync_dir

log = logging.getLogger(__name__)

#: How long a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT_S = 15.0
DIR_MODE = 0o700
# sqlite integers are signed 64-bit; inode numbers are unsigned 64-bit.
_INT64_WRAP = 1 << 64
_INT64_MAX = (1 << 63) - 1


def db_int(value: int) -> int:
    """An unsigned 64-bit integer as sqlite stores it (signed)."""
    return value - _INT64_WRAP if value > _INT64_MAX else value


def from_db_int(value: int) -> int:
    return value + _INT64_WRAP if value < 0 else value


def make_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0o700, or check that it is a directory."""
    try:
        if not path.is_dir():
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; make sure nobody else can read voices.
            os.chmod(path, DIR_MODE)
    except OSError as e:
        raise CacheError(f"cannot create cache directory {path}: {e.strerror or e}") from e


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another process does the same on a new database.

    Changing the journal mode needs an exclusive lock, and sqlite answers "database is locked"
    at once, without its busy handler, while another connection holds one. The mode is
    persistent, so this only contends on the first open of a fresh database.
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


def _is_corruption(exc: BaseException) -> bool:
    """True for sqlite errors that mean the file itself is damaged (not busy, not I/O)."""
    name = getattr(exc, "sqlite_errorname", None)  # Python >= 3.11
    if name is not None:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    msg = str(exc).lower()
    return "not a database" in msg or "malformed" in msg


def split_sql(script: str) -> list[str]:
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


class _Corrupt(Exception):
    """Internal: the database was found corrupt while opening."""


class SqliteIndex:
    """One sqlite file in ``directory``: ``read``/``write``/``conn`` for its users.

    ``schema`` creates version ``version``; ``migrations`` maps an older version to the SQL that
    brings it one version on. A version without a path is rebuilt from ``schema``: what these
    databases hold can be derived again, so dropping it costs recomputation, never correctness.
    """

    def __init__(self, directory: Path, name: str, schema: str, version: int,
                 migrations: Mapping[int, str] | None = None) -> None:
        self.directory = directory
        self.path = directory / name
        self.schema, self.version = schema, version
        self.migrations = dict(migrations or {})
        self._local = threading.local()
        # (owning thread, connection): connections of finished threads are closed lazily.
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._closed = False
        # bumped when the connections must be reopened (a read-only folder became writable)
        self._generation = 0
        #: Read-only filesystem or folder: reads are served, writes raise CacheError until the
        #: folder is writable again, which every write checks.
        self.read_only = not os.access(directory, os.W_OK)
        self._open()

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # so that close() can close other threads' connections
            )
        except sqlite3.Error as e:
            raise CacheError(f"cannot open cache index {self.path}: {e}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # WAL: readers never block the writer and a kill -9 at any moment leaves a
            # consistent database. synchronous=NORMAL: in WAL mode a commit is not fsynced
            # (only checkpoints are), so a *power loss* may roll back the last few commits
            # but never corrupts the file, and kill -9 loses nothing (the WAL is in the OS
            # page cache). The users of this class are built to lose recent commits safely
            # (see the store's module docstring); FULL would cost an fsync per write.
            _set_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        # immutable: no -shm file can be made on a read-only filesystem, and nobody can write
        # there either. Commits still in a -wal file left by a crash are not seen (misses only).
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro&immutable=1"
        try:
            return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise CacheError(f"cannot open read-only cache index {self.path}: {e}") from e

    def writable_again(self) -> bool:
        """For a read-only folder: whether it can be written now (then reopen read-write)."""
        if not os.access(self.directory, os.W_OK):
            return False
        with self._lock:
            if self.read_only:
                self.read_only = False
                self._generation += 1
                log.info("cache folder %s is writable again", self.directory)
        return True

    def _open(self) -> None:
        """Open (creating, migrating or replacing when corrupt) the database."""
        if self.read_only:
            if not self.path.exists():
                raise CacheError(f"cache folder {self.directory} is read-only and holds no {self.path.name}")
            conn = self._connect_read_only()
            try:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
            except sqlite3.Error as e:
                conn.close()
                raise CacheError(f"cannot read cache index {self.path}: {e}") from e
            if version != self.version:
                conn.close()
                raise CacheError(f"read-only cache index {self.path} has schema {version}, expected {self.version}")
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
                    raise CacheError(f"cannot open cache index {self.path}: {e}") from e
                if attempt == 0:
                    # Another process may have just replaced a corrupt file; look again
                    # before moving anything aside.
                    time.sleep(0.05)
                    continue
                self._move_aside(e)
                continue
            self._register(conn)
            return
        raise CacheError(f"cannot open cache index {self.path}: still corrupt after replacing it")

    def _move_aside(self, reason: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        log.warning(
            "cache index %s is corrupt (%s); moving it to %s and starting a fresh index "
            "(cached entries will be recomputed)",
            self.path, reason, target,
        )
        try:
            os.replace(self.path, target)
            # The WAL and shared-memory files belong to the old database; a fresh one must
            # not replay them.
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.replace(side, target.with_name(target.name + suffix))
            fsync_dir(self.directory)
        except FileNotFoundError:
            pass  # another process moved it first
        except OSError as e:
            raise CacheError(f"cannot move corrupt cache index {self.path} aside: {e.strerror}") from e

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        """Create, migrate or rebuild the schema; under the write lock so processes agree."""
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == self.version:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == self.version:
                conn.execute("COMMIT")
                return
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            while tables and version in self.migrations and version != self.version:
                for stmt in split_sql(self.migrations[version]):
                    conn.execute(stmt)
                version += 1
            if version != self.version:
                if tables:
                    log.warning(
                        "cache index %s has schema version %d, expected %d; rebuilding it "
                        "(cached entries will be recomputed)",
                        self.path, version, self.version,
                    )
                for (name, kind) in conn.execute(
                    "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
                    "AND name NOT LIKE 'sqlite_%'"
                ).fetchall():
                    conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
                for stmt in split_sql(self.schema):
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {self.version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def conn(self) -> sqlite3.Connection:
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
                raise CacheError(f"cannot open cache index {self.path}: {e}") from e
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

    # ------------------------------------------------------------------ for the users

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the lock up front (with busy waiting),
        so it can never fail half-way with SQLITE_BUSY when upgrading from a read."""
        if self.read_only and not self.writable_again():
            raise CacheError(f"cache folder {self.directory} is read-only")
        conn = self.conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise CacheError(f"cannot lock cache index {self.path}: {e}") from e
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rollback of cache index %s failed", self.path)
            if isinstance(e, sqlite3.Error):
                raise CacheError(f"cannot update cache index {self.path}: {e}") from e
            raise

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.conn().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise CacheError(f"cannot read cache index {self.path}: {e}") from e

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
