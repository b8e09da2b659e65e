"""The voices folder on disk: which files can be voices, walking it, and what a full rescan finds.

Knows the file system and the library's file records, nothing of voices' states: a rescan
(``walk``, then ``scan``) says, file by file, what the folder holds and which content hash each file has
(from its record when size, mtime and inode match, else hashed here), and the library decides.
"""

from __future__ import annotations

import logging
import os
import stat as statmod
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from voiced.config import VoicesConfig
from voiced.errors import AudioError
from voiced.fsutil import sha256_file
from voiced.library.files import FileRecord
from voiced.library.voice import is_candidate, undecodable

log = logging.getLogger(__name__)


@dataclass
class Scan:
    """What a rescan found, filled in as ``Folder.scan`` goes."""

    unchanged: int = 0
    """Files with a voice made from them as they are, or whose size, mtime and inode matched
    their record: not re-hashed."""
    hashed: list[FileRecord] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)
    """Files modified too recently to be complete for sure: left to the settle tracker."""


class Folder:
    def __init__(self, config: VoicesConfig) -> None:
        self.config = config
        self.root = Path(config.dir)
        self._root_real = os.path.realpath(self.root)
        self._told_undecodable: set[str] = set()

    def accepts(self, path: str) -> bool:
        """Whether a relative path can be a voice (``is_candidate``); says once why a recording
        whose name is not UTF-8 is left out."""
        if is_candidate(path, self.config.extensions):
            return True
        if undecodable(path) and path not in self._told_undecodable:
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if is_candidate(shown, self.config.extensions):  # an audio file, not one ignored anyway
                self._told_undecodable.add(path)
                log.warning("ignoring %s: its name is not valid UTF-8; rename the file", shown)
        return False

    def stat(self, path: str) -> os.stat_result:
        """The file at a relative path (its target's, when symlinks are followed and it has one);
        a dangling symlink's own. Raises FileNotFoundError when there is nothing there."""
        full = self.root / path
        try:
            return full.stat() if self.config.follow_symlinks else full.lstat()
        except FileNotFoundError:
            if not full.is_symlink():
                raise
            return full.lstat()

    def check(self, path: str) -> None:
        """Raise AudioError when the file at ``path`` cannot be a reference, saying why."""
        full = self.root / path
        real = os.path.realpath(full)
        if real != str(full) and not (real + os.sep).startswith(self._root_real + os.sep):
            raise AudioError("symlink points outside the voices folder")
        if os.path.islink(full):
            if not self.config.follow_symlinks:
                raise AudioError("symlinks are not followed ([voices] follow_symlinks = false)")
            if not os.path.exists(full):
                raise AudioError("broken symlink: its target does not exist")
        st = os.stat(full)
        if not statmod.S_ISREG(st.st_mode):
            raise AudioError("not a regular file")
        if st.st_size == 0:
            raise AudioError("empty file (0 bytes)")

    def walk(self, prefix: str = "") -> dict[str, os.stat_result]:
        """Every candidate file below the folder ``prefix`` (default: all of it), by relative path."""
        found: dict[str, os.stat_result] = {}
        root_str = str(self.root)
        stack = [str(self.root / prefix) if prefix else root_str]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot list %s: %s", directory, exc)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = os.path.relpath(entry.path, root_str).replace(os.sep, "/")
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    if not self.accepts(rel):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if statmod.S_ISLNK(st.st_mode) and self.config.follow_symlinks:
                        try:
                            st = entry.stat(follow_symlinks=True)
                        except OSError:
                            pass  # dangling: kept as the link's own stat, reported as failed
                except OSError:
                    continue
                found[rel] = st
        return found

    def scan(self, found: Mapping[str, os.stat_result], records: Mapping[str, FileRecord],
             known: Callable[[str, os.stat_result], bool], recent_s: float,
             into: Scan) -> Iterator[tuple[str, os.stat_result, str | None]]:
        """Of the files ``walk`` found, yield (path, stat, content hash or None) for each that needs
        the library's decision; ``known`` files (a voice made from them as they are) are passed
        over. Files are hashed here, in bulk, so a folder of cached voices is ready without the
        worker; a symlink or a file that cannot be read gets None, and the worker explains."""
        now_ns = time.time_ns()
        for path, st in sorted(found.items()):
            if known(path, st):
                into.unchanged += 1
                continue
            record = records.get(path)
            sha: str | None = None
            if record is not None and (record.size, record.mtime_ns, record.inode) == (st.st_size, st.st_mtime_ns, st.st_ino):
                sha = record.sha256  # hashed complete before, unchanged since
                into.unchanged += 1
            elif recent_s and now_ns - st.st_mtime_ns < recent_s * 1e9:
                into.recent.append(path)  # may still be being written: the settle tracker decides
                continue
            elif st.st_size > 0 and not os.path.islink(self.root / path):
                try:
                    sha = sha256_file(self.root / path)
                except OSError:
                    sha = None
                else:
                    into.hashed.append(FileRecord(path, st.st_size, st.st_mtime_ns, st.st_ino, sha))
            yield path, st, sha
