"""Small filesystem helpers shared by the parts that write durably (cache, model files, plugins)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, tmp_prefix: str | None = None) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old file or the new one, never a part.

    The temporary file sits beside ``path`` (named ``tmp_prefix``..., so a sweep can find
    leftovers) and is fsynced before the rename; the caller fsyncs the folder when the rename
    itself must survive a power cut.
    """
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
