"""The store's object files: one .npz per entry, under a fresh random name, never changed.

    objects/ab/<hex>.npz    one object per entry, written with np.savez, never pickled
    objects/ab/tmp-*.part   a put in progress (or a crashed one; collected after a minute)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from voiced.errors import CacheError
from voiced.fsutil import durable_temp, fsync_dir, read_npz
from voiced.store.index import DIR_MODE, make_dir

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[0-9a-f]{32}\Z")
TEMP_PREFIX = "tmp-"
TEMP_SUFFIX = ".part"
# np.savez takes these as its own parameters, so they cannot name an array.
_RESERVED_ARRAY_NAMES = frozenset({"file", "args", "kwds", "allow_pickle"})


class BadObject(Exception):
    """An object that reads but is not what its index row says (checksum, format)."""


def serialize(arrays: Mapping[str, np.ndarray]) -> bytes:
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


def new_name() -> str:
    return secrets.token_hex(16)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectFiles:
    """The ``objects`` folder of a store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        make_dir(root)

    def path(self, name: str) -> Path:
        return self.root / name[:2] / f"{name}.npz"

    def read(self, name: str, expected_sha256: str) -> dict[str, np.ndarray]:
        """The arrays of object ``name``. FileNotFoundError if it is gone, another OSError if it
        cannot be read (not evidence of damage), BadObject if it is not what was stored."""
        if not NAME_RE.match(name):
            raise BadObject(f"invalid object name {name!r}")
        data = self.path(name).read_bytes()
        if digest(data) != expected_sha256:
            raise BadObject("checksum mismatch")
        try:
            return read_npz(io.BytesIO(data))
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise BadObject(f"unreadable npz ({e})") from e

    def ensure_subdir(self, name: str) -> Path:
        # A stat per put (no memo) so that a cache directory wiped while we run is recreated.
        sub = self.path(name).parent
        if sub.is_dir():
            return sub
        make_dir(self.root)
        try:
            sub.mkdir(mode=DIR_MODE, exist_ok=True)
            fsync_dir(self.root)  # the new directory entry must survive power loss
        except OSError as e:
            raise CacheError(f"cannot create cache directory {sub}: {e.strerror or e}") from e
        return sub

    def write_temp(self, name: str, data: bytes) -> Path:
        """Write ``data`` to a fresh, fsynced temp file beside where ``name`` goes; CacheError on failure."""
        sub = self.ensure_subdir(name)
        opened = False
        try:
            with durable_temp(sub, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX) as (fh, tmp):
                opened = True
                fh.write(data)
        except OSError as e:
            if not opened:
                raise CacheError(f"cannot create a file in cache directory {sub}: {e.strerror or e}") from e
            raise CacheError(f"cannot write cache object {tmp}: {e.strerror or e}") from e
        return tmp

    def place(self, tmp: Path, name: str) -> None:
        """Rename a temp file to its object name, durably (the object before its row)."""
        final = self.path(name)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def unlink(self, names: Iterable[str]) -> None:
        """Delete objects whose rows are already gone (committed); failures only leave orphans."""
        for name in names:
            if not NAME_RE.match(name):
                continue
            path = self.path(name)
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another process's garbage collection got there first
            except OSError as e:
                log.warning("cannot delete cache object %s: %s", path, e.strerror)

    def remove_orphans(self, known: set[str], now: float, temp_max_age_s: float) -> int:
        """Delete objects not in ``known`` and temp files older than ``temp_max_age_s``; how many."""
        removed = 0
        try:
            subdirs = [d for d in os.scandir(self.root) if len(d.name) == 2 and d.is_dir(follow_symlinks=False)]
        except OSError as e:
            log.warning("cannot list cache objects in %s: %s", self.root, e.strerror)
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
                    if fname.endswith(".npz") and NAME_RE.match(fname[:-4]):
                        if fname[:-4] in known:
                            continue
                        log.debug("removing orphan cache object %s", f.path)
                    elif fname.startswith(TEMP_PREFIX) and fname.endswith(TEMP_SUFFIX):
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
