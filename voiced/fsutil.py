"""Small filesystem helpers shared by the parts that read and write durably (cache, model files,
plugins): each exists once, here, at the bottom of the import order."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

DIGEST_SUFFIX = ".sha256"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


@contextmanager
def durable_temp(directory: Path, *, prefix: str, suffix: str = ".tmp") -> Iterator[tuple[BinaryIO, Path]]:
    """A fresh file in ``directory`` to write, fsynced when the block ends and removed if it
    raises: the first half of an atomic write, whose caller renames it into place when it
    chooses (the store does so under its index's lock)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path: Path, *, tmp_prefix: str | None = None) -> Iterator[BinaryIO]:
    """A file to write ``path`` through, so a crash leaves the old file or the new one, never a part.

    The temporary file sits beside ``path`` (named ``tmp_prefix``..., so a sweep can find
    leftovers) and is fsynced before the rename, which happens only if the block ends without an
    exception; the caller fsyncs the folder when the rename itself must survive a power cut.
    """
    with durable_temp(path.parent, prefix=tmp_prefix or f".{path.name}.") as (fh, tmp):
        yield fh
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, *, tmp_prefix: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_writer``)."""
    with atomic_writer(path, tmp_prefix=tmp_prefix) as fh:
        fh.write(data)


def write_with_digest(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, then its sha256 beside it (``path`` + DIGEST_SUFFIX): a derived
    file that ``digest_matches`` then trusts. The digest goes last, so a crash between the two
    leaves a file that is not trusted and gets made again."""
    atomic_write(path, data)
    atomic_write(path.with_name(path.name + DIGEST_SUFFIX), hashlib.sha256(data).hexdigest().encode("ascii"))
    fsync_dir(path.parent)


def digest_matches(path: Path) -> bool:
    """Whether ``path`` exists and matches the digest ``write_with_digest`` put beside it."""
    try:
        expected = path.with_name(path.name + DIGEST_SUFFIX).read_text(encoding="ascii").strip()
        return path.is_file() and expected == sha256_file(path)
    except OSError:
        return False


# numpy parses every array header with ast.literal_eval, and CPython 3.11's AST constructor is not
# safe across threads: two reads at once can fail with "SystemError: AST constructor recursion
# depth mismatch" (seen with four threads sharing a cache). Every npz read in the process takes
# this lock; the reads are copies from memory or page cache, so it costs nothing measurable.
_NPZ_READ_LOCK = threading.Lock()


def read_npz(source: str | os.PathLike[str] | io.BytesIO) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (a path or an in-memory file), never unpickling; thread-safe."""
    with _NPZ_READ_LOCK, np.load(source, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


__all__ = ["DIGEST_SUFFIX", "atomic_write", "atomic_writer", "digest_matches", "fsync_dir", "read_npz", "sha256_file",
           "write_with_digest"]
