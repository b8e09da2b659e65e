"""The voice library: which recordings the folder holds, and their preparation.

The library is the one place that decides a voice's state. The watcher tells it that a
path changed (``sync_path``) and a start-up or overflow rescan tells it what the whole
folder holds (``reconcile``); it looks at the file itself and decides. It is made of one part
per concept, wired here:

- ``registry``: the voices and their states (the only place they change);
- ``folder``: the files on disk, walking and rescanning them;
- ``files``: the file records (size, mtime, inode -> content hash) and the store's holds;
- ``preparer``: the worker that embeds and conditions voices, stage by stage;
- ``results``: prepared results between the worker and the store (write-behind, hot set).

Every result is stored under the file's content hash, so a renamed file, a restart or a second
daemon reuse it. A file changed while it is being prepared bumps the voice's generation and the
stale result is dropped, never published.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voiced.config import VoicesConfig
from voiced.embedding import embedding_kind
from voiced.engines.base import Engine, SpeakerEncoder
from voiced.errors import CacheError
from voiced.library.files import FileRecord, FileRecords, holder_name
from voiced.library.folder import Folder, Scan
from voiced.library.preparer import MIN_VOICED_FRACTION, Preparer
from voiced.library.registry import Registry
from voiced.library.results import NOT_CACHED, Prepared, Results
from voiced.library.voice import Voice, VoiceState
from voiced.store import ArtifactStore

__all__ = ["Library", "MIN_VOICED_FRACTION", "ReconcileReport", "VoiceListener"]

log = logging.getLogger(__name__)

VoiceListener = Callable[[str, dict[str, Any]], None]
"""Called with (event, voice dict); events: ``preparing``, ``ready``, ``failed``, ``removed``, ``stage``."""


@dataclass(frozen=True)
class ReconcileReport:
    files: int
    unchanged: int
    """Files whose size, mtime and inode matched the cache's record: not re-hashed."""
    hashed: int
    ready: int
    queued: int
    removed: int
    seconds: float


class Library:
    def __init__(
        self,
        config: VoicesConfig,
        cache: ArtifactStore,
        encoder: SpeakerEncoder,
        *,
        files: FileRecords | None = None,
        engine: Engine | None = None,
        preprocess: bool = True,
        stage_budget_s: float | None = None,
        hot_voices: int = 64,
        listeners: Iterable[VoiceListener] = (),
        workers: int = 1,
    ) -> None:
        self.config = config
        self.root = Path(config.dir)
        self.cache = cache
        # the folder's file records: beside a local store's index unless told otherwise
        self.files = files if files is not None else FileRecords(
            Path(getattr(cache, "directory")), holder_name(self.root), cache)
        self.encoder = encoder
        self.engine = engine
        self.listeners: list[VoiceListener] = list(listeners)
        self.results = Results(cache, hot_voices)
        self.prepared = Prepared(
            self.results, f"{encoder.model_id}@{encoder.version}", embedding_kind(preprocess, config.max_duration_s),
            f"{engine.name}@{engine.version}" if engine else None, engine.stages if engine else (),
        )
        self.registry = Registry()
        self.folder = Folder(config)
        self.preparer = Preparer(
            config=config, registry=self.registry, folder=self.folder, files=self.files, prepared=self.prepared,
            encoder=encoder, engine=engine, preprocess=preprocess, stage_budget_s=stage_budget_s,
            emit=self._emit, resync=self.sync_path, workers=workers,
        )

    # ------------------------------------------------------------------ queries

    def voices(self) -> list[dict[str, Any]]:
        return self.registry.listing()

    def get(self, name: str) -> Voice | None:
        """A copy of the voice called ``name`` (looked up, never joined onto a path; in any Unicode form)."""
        return self.registry.get(name)

    def counts(self) -> dict[str, int]:
        return self.registry.counts()

    def queue_depth(self) -> int:
        return self.preparer.depth()

    def embedding(self, name: str) -> np.ndarray | None:
        """The speaker embedding of a ready voice (from the cache), or None."""
        voice = self.get(name)
        if voice is None or voice.sha256 is None or voice.state is not VoiceState.READY:
            return None
        return self.prepared.embedding(voice.sha256)

    def conditioning(self, name: str) -> tuple[str, Mapping[str, np.ndarray]] | None:
        """(stage, arrays) of the most refined engine stage cached for a ready voice."""
        voice = self.get(name)
        if voice is None or voice.sha256 is None or self.engine is None or voice.stage is None:
            return None
        for stage in reversed(self.engine.stages[: self.engine.stages.index(voice.stage) + 1]):
            conditioning = self.prepared.conditioning(voice.sha256, stage)
            if conditioning is not None:
                if stage != voice.stage:
                    self._lost(voice, stage)
                return stage, conditioning
        self._lost(voice, None)
        return None

    def _lost(self, seen: Voice, reached: str | None) -> None:
        """The cache lost a ready voice's results (a corrupt object, dropped on read): prepare again.

        With an earlier stage still there, the voice stays ready at that stage and the later
        ones run again in the background; with nothing left it goes back to pending.
        """
        with self.registry.changing():
            if not self.registry.lost(seen, reached):
                return
            log.warning("cache lost the %s results of voice %s; preparing them again",
                        seen.stage, seen.name, extra={"voice": seen.name})
            self.preparer.enqueue(seen.path, background=reached is not None)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (re-checked at every state change) or the timeout."""
        return self.registry.wait_for(predicate, timeout)

    def set_external_demand(self, demand: Callable[[], bool]) -> None:
        """Background stages yield whenever ``demand()`` is true (e.g. synthesis requests queued)."""
        self.preparer.set_demand(demand)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.preparer.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.preparer.stop(timeout)

    # ------------------------------------------------------------------ folder changes

    def reconcile(self, *, recent_s: float = 0.0) -> tuple[ReconcileReport, list[str]]:
        """Bring the library in line with the folder (start-up, overflow, periodic safety rescan).

        Files whose size, mtime and inode match what the cache recorded are not re-hashed.
        Returns the report and the paths modified within ``recent_s`` seconds, which may still be
        being written: the caller hands those to its settle tracker instead.
        """
        started = time.monotonic()
        found = self.folder.walk()
        records = self.files.all()
        gone = [p for p in records if p not in found]
        if gone:
            try:
                self.files.forget(gone)
            except CacheError as exc:
                log.warning("cannot forget %d files in the file records: %s", len(gone), exc)
        removed = [p for p in self.registry.paths() if p not in found]
        for path in removed:
            self._remove(path, reason="no longer in the folder")
        scan = Scan()
        ready = queued = 0
        for path, st, sha in self.folder.scan(found, records, self.registry.unchanged, recent_s, scan):
            outcome = self._adopt(path, st, sha, announce=False)
            if outcome == "ready":
                ready += 1
            elif outcome == "queued":
                queued += 1
        if scan.hashed:
            self.files.record_or_keep(scan.hashed)
        try:
            self.files.sync()  # the store holds exactly what the records refer to
        except CacheError as exc:
            log.warning("cannot tell the cache which content the folder holds: %s", exc)
        report = ReconcileReport(
            files=len(found),
            unchanged=scan.unchanged,
            hashed=len(scan.hashed),
            ready=ready,
            queued=queued,
            removed=len(removed) + len(gone),
            seconds=time.monotonic() - started,
        )
        log.info(
            "reconciled %d files in %.3fs: %d unchanged, %d hashed, %d ready from cache, %d queued, %d removed",
            report.files, report.seconds, report.unchanged, report.hashed, report.ready, report.queued, report.removed,
        )
        return report, scan.recent

    def accepts(self, path: str) -> bool:
        """Whether a relative path can be a voice; says once why a name that is not UTF-8 is left out."""
        return self.folder.accepts(path)

    def sync_path(self, path: str) -> None:
        """Look at one relative path again: new, changed, or gone. Called once the file is complete."""
        if not self.accepts(path):
            return
        try:
            st = self.folder.stat(path)
        except FileNotFoundError:
            self._remove(path, reason="deleted")
            return
        except OSError as exc:
            log.warning("cannot stat %s: %s", path, exc)
            return
        if self.registry.unchanged(path, st, failed_too=False):
            return
        sha = self.registry.sha_of(st)
        if sha is not None:  # moved: same content under a new name, no need to re-hash
            self.files.record_or_keep([FileRecord(path, st.st_size, st.st_mtime_ns, st.st_ino, sha)])
        self._adopt(path, st, sha)

    def remove_tree(self, prefix: str) -> None:
        """A folder left the voices folder (deleted or moved out): drop every voice below it."""
        for path in self.registry.paths(prefix):
            self._remove(path, reason="folder removed")

    def sync_tree(self, prefix: str) -> None:
        """A folder arrived or changed: look at every file below it, and at voices no longer there."""
        for path in self.registry.paths(prefix):
            self.sync_path(path)
        for path in self.folder.walk(prefix):
            self.sync_path(path)

    def retry_unsaved(self) -> int:
        """Store results a full or read-only cache refused earlier; how many are stored now.

        Called periodically, so room made in the cache (or a remount read-write) is used without
        a restart. Results of content no voice has any more are dropped from memory instead.
        """
        present = self.registry.contents()

        def still_so(record: FileRecord) -> bool:
            voice = self.registry.snapshot(record.path)
            return voice is not None and voice.sha256 == record.sha256

        # file records first: without one, stored content would count as unreferenced
        if not self.files.retry(still_so):
            return 0
        stored, done = self.results.retry(present)
        if done:
            self.registry.clear_note(done, NOT_CACHED)
        if stored:
            log.info("stored %d prepared results the cache had refused earlier", stored)
        return stored

    # ------------------------------------------------------------------ internals

    def _adopt(self, path: str, st: os.stat_result, sha: str | None, *, announce: bool = True) -> str:
        """Take a new or changed file in: ready at once if the cache has all it needs, else queue it."""
        cached = self.prepared.cached(sha) if sha is not None else None  # read before the registry's lock
        with self.registry.changing():
            outcome, voice = self.registry.adopt(path, st, sha, cached)
            if outcome == "queued":
                self.preparer.enqueue(path)
        if outcome == "ready":
            log.log(logging.INFO if announce else logging.DEBUG, "voice ready: %s (from cache)", voice.name,
                    extra={"voice": voice.name})
            self._emit("ready", voice.to_dict())
            self.preparer.follow_up(path)
        elif outcome == "failed":
            log.warning("voice failed: %s: %s", voice.name, voice.error, extra={"voice": voice.name})
            self._emit("failed", voice.to_dict())
        return outcome

    def _remove(self, path: str, *, reason: str) -> None:
        voice, contenders = self.registry.remove(path)
        if voice is None:
            return
        try:
            self.files.forget([path])
        except CacheError as exc:
            log.warning("cannot forget %s in the cache: %s", path, exc)
        log.info("voice removed: %s (%s)", voice.name, reason, extra={"voice": voice.name})
        self._emit("removed", voice.to_dict())
        for contender in contenders:
            self.sync_path(contender)

    def _emit(self, event: str, voice: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, voice)
            except Exception:  # a listener's bug must not stop preparation
                log.exception("voice %s listener failed", event)
