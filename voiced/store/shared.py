"""The shared artefact store: a folder that several machines mount (NFS, SMB, a cluster
filesystem), so a voice prepared on one machine is never prepared again on another.

A network filesystem gives no dependable locks, and sqlite's WAL does not work on one, so this
store keeps no index: every artefact is one file at a path computed from its key, written to a
temp file, fsynced and renamed into place (atomic on every POSIX filesystem, NFS included), and
every holder writes only its own file of holds, so no two machines ever write one file.

Layout::

    FORMAT                          "voiced-shared-store 1"
    clock                           touched by each collection: the file server's "now"
    entries/ab/<source>/<key>.art   one artefact: a magic line, a JSON header line (producer,
                                    kind, the payload's sha256, meta), then the .npz payload
    entries/ab/<source>/tmp-*.part  a put in progress (or a crashed one; collected after a minute)
    entries/ab/<source>/unheld      no holder held this source at the last collection (since mtime)
    holders/<hash>.json             one holder's sources: {"holder": ..., "sources": [...]}

``<key>`` is a hash of the producer and kind, which may hold any characters; the header names
both, so a read checks it got the artefact it asked for. Times for the grace period are the
file server's (mtimes compared with a file touched just before), so machines whose clocks
disagree still agree on how long a source has gone unheld.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voiced.errors import CacheError
from voiced.fsutil import atomic_write, durable_temp, fsync_dir, read_npz
from voiced.store import objects as obj
from voiced.store.base import Lookups, StoreStats

__all__ = ["FolderStore"]

log = logging.getLogger(__name__)

FORMAT = "voiced-shared-store 1"
MAGIC = b"voiced-artefact 1\n"
SUFFIX = ".art"
UNHELD = "unheld"
TEMP_FILE_MAX_AGE_S = 60.0
_SOURCE_LEN = 64  # a sha256 in hex


def _key_name(producer: str, kind: str) -> str:
    return hashlib.sha256(f"{producer}\0{kind}".encode()).hexdigest()[:32]


def _check_source(source: str) -> str:
    # the source names a folder: only a content hash may, never a path
    if len(source) != _SOURCE_LEN or any(c not in "0123456789abcdef" for c in source):
        raise ValueError(f"not a sha256 in hex: {source!r}")
    return source


class FolderStore:
    """Content-keyed store in a folder shared by machines; see the module docstring.

    Entries are never counted against a size limit here: what no holder holds goes at
    ``collect_garbage``, and each machine's local store (the read-through cache in front of
    this one, see tiered.py) keeps its own limit.
    """

    size_limit_bytes: int | None = None

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._entries = self.directory / "entries"
        self._holders = self.directory / "holders"
        self._lock = threading.Lock()  # guards the holds below
        self._lookups = Lookups()
        self._held: dict[str, set[str]] = {}  # this process's holders: what their files say
        try:
            for d in (self.directory, self._entries, self._holders):
                d.mkdir(mode=0o755, exist_ok=True)
            marker = self.directory / "FORMAT"
            if not marker.exists():
                atomic_write(marker, (FORMAT + "\n").encode())
        except OSError as e:
            raise CacheError(f"cannot use shared store folder {self.directory}: {e.strerror or e}") from e
        found = marker.read_text(errors="replace").strip()
        if found != FORMAT:
            raise CacheError(f"{marker}: not a store this version can use ({found!r}; expected {FORMAT!r})")

    def _check_mounted(self) -> None:
        """CacheError unless the share is there: a mount that went away leaves an empty folder,
        and what is written there is on this machine's disk, where no other machine sees it."""
        if not (self.directory / "FORMAT").is_file():
            raise CacheError(f"the shared store {self.directory} is not there (is the share mounted?)")

    # ------------------------------------------------------------------ entries

    def _dir(self, source: str) -> Path:
        return self._entries / source[:2] / _check_source(source)

    def _path(self, source: str, producer: str, kind: str) -> Path:
        return self._dir(source) / (_key_name(producer, kind) + SUFFIX)

    def _read(self, path: Path, producer: str, kind: str, header_only: bool) -> tuple[dict[str, Any], bytes] | None:
        """(header, payload) of one artefact file, None if it is absent; BadObject if it is damaged."""
        try:
            with open(path, "rb") as fh:
                if fh.readline() != MAGIC:
                    raise obj.BadObject("not an artefact file")
                try:
                    header = json.loads(fh.readline())
                except ValueError as e:
                    raise obj.BadObject(f"unreadable header ({e})") from e
                if not isinstance(header, dict) or header.get("producer") != producer or header.get("kind") != kind:
                    raise obj.BadObject("the header names another artefact")
                payload = b"" if header_only else fh.read()
        except FileNotFoundError:
            return None
        if not header_only and obj.digest(payload) != header.get("sha256"):
            raise obj.BadObject("checksum mismatch")
        return header, payload

    def _load(self, source: str, producer: str, kind: str, header_only: bool) -> tuple[dict[str, Any], bytes] | None:
        path = self._path(source, producer, kind)
        try:
            stat = path.stat()
            found = self._read(path, producer, kind, header_only)
        except FileNotFoundError:
            found = None
        except obj.BadObject as e:
            log.warning("shared store: dropping damaged artefact %s: %s", path, e)
            self._drop_if_same(path, stat)
            found = None
        except OSError as e:  # the share is away or unreadable: a miss, not damage
            log.warning("shared store: cannot read %s: %s", path, e.strerror or e)
            found = None
        self._lookups.count(found is not None)
        return found

    @staticmethod
    def _drop_if_same(path: Path, stat: os.stat_result) -> None:
        # only the file that was read: a put may have renamed a good one over it since
        try:
            now = path.stat()
            if (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns):
                path.unlink()
        except OSError:
            pass

    def get(self, source: str, producer: str, kind: str) -> dict[str, np.ndarray] | None:
        entry = self.get_entry(source, producer, kind)
        return None if entry is None else entry[0]

    def get_entry(self, source: str, producer: str, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        found = self._load(source, producer, kind, header_only=False)
        if found is None:
            return None
        header, payload = found
        try:
            arrays = read_npz(io.BytesIO(payload))
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            log.warning("shared store: unreadable artefact payload for %s: %s", source[:12], e)
            return None
        return arrays, dict(header.get("meta") or {})

    def get_meta(self, source: str, producer: str, kind: str) -> dict[str, Any] | None:
        found = self._load(source, producer, kind, header_only=True)
        return None if found is None else dict(found[0].get("meta") or {})

    def has(self, source: str, producer: str, kind: str) -> bool:
        try:
            return self._path(source, producer, kind).is_file()
        except OSError:
            return False

    def put(self, source: str, producer: str, kind: str, arrays: Mapping[str, np.ndarray],
            meta: Mapping[str, Any] | None = None) -> None:
        payload = obj.serialize(arrays)
        header = {"producer": producer, "kind": kind, "sha256": obj.digest(payload), "meta": dict(meta or {})}
        try:
            line = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise CacheError(f"artefact metadata is not plain JSON: {e}") from e
        folder = self._dir(source)
        self._check_mounted()
        try:
            folder.parent.mkdir(mode=0o755, exist_ok=True)
            folder.mkdir(mode=0o755, exist_ok=True)
            with durable_temp(folder, prefix=obj.TEMP_PREFIX, suffix=obj.TEMP_SUFFIX) as (fh, tmp):
                fh.write(MAGIC + line + b"\n" + payload)
            os.replace(tmp, self._path(source, producer, kind))
            fsync_dir(folder)
        except OSError as e:
            raise CacheError(f"cannot write to the shared store {folder}: {e.strerror or e}") from e

    def evict(self, source: str) -> int:
        folder = self._dir(source)
        try:
            count = sum(1 for p in folder.iterdir() if p.suffix == SUFFIX)
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("shared store: cannot list %s: %s", folder, e.strerror or e)
            return 0
        shutil.rmtree(folder, ignore_errors=True)
        return count

    # ------------------------------------------------------------------ holds

    def _holder_file(self, holder: str) -> Path:
        return self._holders / (hashlib.sha256(holder.encode()).hexdigest()[:24] + ".json")

    def _held_by(self, holder: str) -> set[str]:
        """This holder's sources, from its file the first time (a restarted daemon finds them)."""
        if holder not in self._held:
            try:
                doc = json.loads(self._holder_file(holder).read_text())
                self._held[holder] = {_check_source(s) for s in doc["sources"]}
            except FileNotFoundError:
                self._held[holder] = set()
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("shared store: holds of %s unreadable (%s); starting them afresh", holder, e)
                self._held[holder] = set()
        return self._held[holder]

    def _write_holds(self, holder: str, sources: set[str]) -> None:
        doc = {"holder": holder, "sources": sorted(sources)}
        self._check_mounted()
        try:
            atomic_write(self._holder_file(holder), json.dumps(doc).encode())
        except OSError as e:
            raise CacheError(f"cannot write holds to the shared store {self._holders}: {e.strerror or e}") from e
        self._held[holder] = sources

    def hold(self, holder: str, sources: Iterable[str]) -> None:
        with self._lock:
            held = self._held_by(holder)
            new = held | {_check_source(s) for s in sources}
            if new != held:
                self._write_holds(holder, new)

    def release(self, holder: str, sources: Iterable[str]) -> None:
        with self._lock:
            held = self._held_by(holder)
            new = held - set(sources)
            if new != held:
                self._write_holds(holder, new)

    def retain(self, holder: str, live: Iterable[str]) -> None:
        with self._lock:
            new = {_check_source(s) for s in live}
            if new != self._held_by(holder) or not self._holder_file(holder).exists():
                self._write_holds(holder, new)

    def holders(self, source: str) -> list[str]:
        """Who holds one content hash, by every holder's file."""
        held = self._all_holds()
        return sorted(h for h, sources in (held or {}).items() if source in sources)

    def _all_holds(self) -> dict[str, set[str]] | None:
        """Every holder's sources; None if a holder's file cannot be read (then nobody's
        content may be collected: it might be that holder's)."""
        out: dict[str, set[str]] = {}
        try:
            files = [p for p in self._holders.iterdir() if p.suffix == ".json"]
        except OSError as e:
            log.warning("shared store: cannot list holders in %s: %s", self._holders, e.strerror or e)
            return None
        for path in files:
            try:
                doc = json.loads(path.read_text())
                out[str(doc["holder"])] = set(doc["sources"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("shared store: cannot read holds %s (%s): collecting nothing", path, e)
                return None
        return out

    # ------------------------------------------------------------------ maintenance

    def _server_now(self) -> float:
        clock = self.directory / "clock"
        clock.touch()
        os.utime(clock)
        return clock.stat().st_mtime

    def collect_garbage(self, grace_s: float = 0.0, *, temp_max_age_s: float = TEMP_FILE_MAX_AGE_S) -> int:
        """Drop the artefacts of sources no holder anywhere has held for ``grace_s`` (two
        collections apart at least: the first marks a source unheld), and stale temp files."""
        try:
            self._check_mounted()
        except CacheError as e:
            log.warning("%s: collecting nothing", e)
            return 0
        held_map = self._all_holds()
        if held_map is None:
            return 0
        held = set().union(*held_map.values()) if held_map else set()
        try:
            now = self._server_now()
            shards = [d for d in self._entries.iterdir() if len(d.name) == 2 and d.is_dir()]
        except OSError as e:
            log.warning("shared store: cannot collect in %s: %s", self.directory, e.strerror or e)
            return 0
        removed = 0
        for shard in shards:
            try:
                folders = [d for d in shard.iterdir() if len(d.name) == _SOURCE_LEN]
            except OSError:
                continue
            for folder in folders:
                removed += self._collect_source(folder, folder.name in held, now, grace_s, temp_max_age_s)
        if removed:
            log.info("shared store: collected %d files of unheld content", removed)
        return removed

    @staticmethod
    def _collect_source(folder: Path, held: bool, now: float, grace_s: float, temp_max_age_s: float) -> int:
        marker = folder / UNHELD
        removed = 0
        try:
            if held:
                marker.unlink(missing_ok=True)
            else:
                if marker.exists():
                    since = marker.stat().st_mtime
                else:
                    marker.touch()
                    since = now
                if now - since >= grace_s:
                    removed = sum(1 for p in folder.iterdir() if p.suffix == SUFFIX)
                    shutil.rmtree(folder, ignore_errors=True)
                    return removed
            for p in folder.iterdir():
                if p.name.startswith(obj.TEMP_PREFIX) and now - p.stat().st_mtime >= temp_max_age_s:
                    p.unlink(missing_ok=True)
                    removed += 1
        except OSError as e:
            log.warning("shared store: cannot collect %s: %s", folder, e.strerror or e)
        return removed

    def stats(self) -> StoreStats:
        """Entries and bytes by walking the folder (the share keeps no totals), this process's
        hits and misses."""
        entries = size = 0
        for root, _dirs, files in os.walk(self._entries):
            for name in files:
                if name.endswith(SUFFIX):
                    try:
                        size += os.stat(os.path.join(root, name)).st_size
                        entries += 1
                    except OSError:
                        pass
        return StoreStats(entries, size, *self._lookups.read(), None)

    def close(self) -> None:
        """Nothing is held open between calls."""

    def __repr__(self) -> str:
        return f"FolderStore({str(self.directory)!r})"
