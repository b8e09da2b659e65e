"""The voice library: which recordings the folder holds, and their preparation.

The library is the one place that decides a voice's state. The watcher tells it that a
path changed (``sync_path``) and a start-up or overflow rescan tells it what the whole
folder holds (``reconcile``); it looks at the file itself and decides. Preparation runs on
one worker thread: hash -> speaker embedding -> each engine stage, every result stored in
the cache under the file's content hash, so a renamed file, a restart or a second daemon
reuse it. A file changed while it is being prepared bumps the voice's generation and the
stale result is dropped, never published.
"""

from __future__ import annotations

import inspect
import logging
import os
import stat as statmod
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

from voiced.audio import load_audio, voiced_fraction
from voiced.store import ArtifactStore
from voiced.config import VoicesConfig
from voiced.embedding import audio_meta, embedding_kind
from voiced.engines.base import Conditioning, Engine
from voiced.errors import AudioError, CacheError
from voiced.fsutil import sha256_file
from voiced.library.files import FileRecord, FileRecords, holder_name
from voiced.library.results import NOT_CACHED, Results
from voiced.library.voice import Voice, VoiceState, is_candidate, normalize_name, undecodable, voice_name

log = logging.getLogger(__name__)
_PAUSE_POLL_S = 0.02  # how often a paused background stage looks whether requests are still waiting
# A stage paused this long is abandoned (and runs again once requests stop): under that much
# uninterrupted traffic it cannot progress anyway, and an engine that wrongly holds a lock its
# synthesis needs while it asks should_stop cannot hold requests up for longer than this.
_MAX_PAUSE_S = 60.0
_RESUME_QUIET_S = 1.0  # how long no request must have waited before a paused stage goes on
# A reference must be speech with a voice in it: the test speakers' clips read 0.64-0.90, one of
# them drowned in white noise at 0 dB SNR 0.18; white, pink and brown noise and mains hum 0-0.03.
MIN_VOICED_FRACTION = 0.1


class Embedder(Protocol):
    """What the library needs of a speaker encoder."""

    model_id: str
    version: str

    def embed(self, wav: np.ndarray, *, preprocess: bool = True) -> np.ndarray: ...


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


@dataclass(frozen=True)
class _Job:
    path: str
    generation: int
    background: bool = False


class Library:
    def __init__(
        self,
        config: VoicesConfig,
        cache: ArtifactStore,
        encoder: Embedder,
        *,
        files: FileRecords | None = None,
        engine: Engine | None = None,
        preprocess: bool = True,
        stage_budget_s: float | None = None,
        hot_voices: int = 64,
        listeners: Iterable[VoiceListener] = (),
    ) -> None:
        self.config = config
        self.root = Path(config.dir)
        self.cache = cache
        # the folder's file records: beside a local store's index unless told otherwise
        self.files = files if files is not None else FileRecords(
            Path(getattr(cache, "directory")), holder_name(self.root), cache)
        self.encoder = encoder
        self.engine = engine
        self.preprocess = preprocess
        self.stage_budget_s = stage_budget_s
        self.results = Results(cache, hot_voices)
        self.listeners: list[VoiceListener] = list(listeners)
        self.encoder_producer = f"{encoder.model_id}@{encoder.version}"
        self.embedding_kind = embedding_kind(preprocess, config.max_duration_s)
        self.engine_producer = f"{engine.name}@{engine.version}" if engine else None
        self._engine_reports_progress = engine is not None and _takes_keyword(engine.prepare_voice, "progress")

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._voices: dict[str, Voice] = {}
        self._owner_of_name: dict[str, str] = {}
        self._urgent: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._queued: set[tuple[str, bool]] = set()
        self._work = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._busy_path: str | None = None
        self._root_real = os.path.realpath(self.root)
        self._unrecorded: dict[str, FileRecord] = {}  # file records the cache refused, by path
        self._external_demand: Callable[[], bool] = lambda: False
        self._told_undecodable: set[str] = set()

    # ------------------------------------------------------------------ queries

    def voices(self) -> list[dict[str, Any]]:
        with self._lock:
            return [v.to_dict() for v in sorted(self._voices.values(), key=lambda v: v.name)]

    def get(self, name: str) -> Voice | None:
        """A copy of the voice called ``name`` (looked up, never joined onto a path; in any Unicode form)."""
        with self._lock:
            path = self._owner_of_name.get(normalize_name(name))
            voice = self._voices.get(path) if path is not None else None
            return replace(voice) if voice else None

    def get_by_path(self, path: str) -> Voice | None:
        with self._lock:
            voice = self._voices.get(path)
            return replace(voice) if voice else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {state.value: 0 for state in VoiceState}
            for voice in self._voices.values():
                out[voice.state.value] += 1
            return out

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._urgent) + len(self._background) + (1 if self._busy_path else 0)

    def embedding(self, name: str) -> np.ndarray | None:
        """The speaker embedding of a ready voice (from the cache), or None."""
        voice = self.get(name)
        if voice is None or voice.sha256 is None or voice.state is not VoiceState.READY:
            return None
        arrays = self.results.arrays((voice.sha256, self.encoder_producer, self.embedding_kind))
        return None if arrays is None else arrays["embedding"]

    def conditioning(self, name: str) -> tuple[str, Mapping[str, np.ndarray]] | None:
        """(stage, arrays) of the most refined engine stage cached for a ready voice."""
        voice = self.get(name)
        if voice is None or voice.sha256 is None or self.engine is None or voice.stage is None:
            return None
        for stage in reversed(self.engine.stages[: self.engine.stages.index(voice.stage) + 1]):
            conditioning = self._conditioning(voice.sha256, stage)
            if conditioning is not None:
                if stage != voice.stage:
                    self._rebuild(voice, stage)
                return stage, conditioning
        self._rebuild(voice, None)
        return None

    def _rebuild(self, seen: Voice, reached: str | None) -> None:
        """The cache lost a ready voice's results (a corrupt object, dropped on read): prepare again.

        With an earlier stage still there, the voice stays ready at that stage and the later
        ones run again in the background; with nothing left it goes back to pending.
        """
        with self._lock:
            voice = self._voices.get(seen.path)
            if voice is None or voice.generation != seen.generation or voice.state is not VoiceState.READY:
                return
            log.warning("cache lost the %s results of voice %s; preparing them again",
                        voice.stage, voice.name, extra={"voice": voice.name})
            if reached is not None:
                voice.stage = reached
                self._enqueue_locked(_Job(voice.path, voice.generation, background=True))
            else:
                voice.state, voice.stage = VoiceState.PENDING, None
                self._enqueue_locked(_Job(voice.path, voice.generation))
            self._changed.notify_all()

    def _conditioning(self, sha: str, stage: str) -> Conditioning | None:
        return self.results.conditioning((sha, self.engine_producer or "", stage))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (re-checked at every state change) or the timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    def set_external_demand(self, demand: Callable[[], bool]) -> None:
        """Background stages yield whenever ``demand()`` is true (e.g. synthesis requests queued)."""
        self._external_demand = demand

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        with self._lock:
            if self._worker is not None:
                return
            self._stopping = False
            self._worker = threading.Thread(target=self._run_worker, name="voiced-prepare", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._work.notify_all()
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(timeout)
            if worker.is_alive():
                log.warning("preparation worker still busy after %.1fs; leaving it", timeout)

    # ------------------------------------------------------------------ folder changes

    def reconcile(self, *, recent_s: float = 0.0) -> tuple[ReconcileReport, list[str]]:
        """Bring the library in line with the folder (start-up, overflow, periodic safety rescan).

        Files whose size, mtime and inode match what the cache recorded are not re-hashed.
        Returns the report and the paths modified within ``recent_s`` seconds, which may still be
        being written: the caller hands those to its settle tracker instead.
        """
        started = time.monotonic()
        found = self._walk()
        records = self.files.all()
        now_ns = time.time_ns()
        recent: list[str] = []
        unchanged = ready = queued = 0
        gone = [p for p in records if p not in found]
        if gone:
            self.files.forget(gone)
        with self._lock:
            removed = [p for p in self._voices if p not in found]
        for path in removed:
            self._remove(path, reason="no longer in the folder")
        hashed: list[FileRecord] = []
        for path, st in sorted(found.items()):
            with self._lock:
                current = self._voices.get(path)
                if current is not None and _same_file(current, st):
                    unchanged += 1
                    continue
            record = records.get(path)
            sha: str | None = None
            if record is not None and (record.size, record.mtime_ns, record.inode) == (st.st_size, st.st_mtime_ns, st.st_ino):
                sha = record.sha256  # hashed complete before, unchanged since
                unchanged += 1
            elif recent_s and now_ns - st.st_mtime_ns < recent_s * 1e9:
                recent.append(path)  # may still be being written: the settle tracker decides
                continue
            elif st.st_size > 0 and not os.path.islink(self.root / path):
                # hashed here, in bulk, so a folder of cached voices is ready without the worker;
                # symlinks and unreadable files are left to the worker, which explains failures
                try:
                    sha = sha256_file(self.root / path)
                except OSError:
                    sha = None
                else:
                    hashed.append(FileRecord(path, st.st_size, st.st_mtime_ns, st.st_ino, sha))
            outcome = self._adopt(path, st, sha, announce=False)
            if outcome == "ready":
                ready += 1
            elif outcome == "queued":
                queued += 1
        if hashed:
            try:
                self.files.record(hashed)
            except CacheError as exc:
                log.warning("cannot record hashes in the cache index: %s", exc)
                with self._lock:
                    self._unrecorded.update((r.path, r) for r in hashed)
        try:
            self.files.sync()  # the store holds exactly what the records refer to
        except CacheError as exc:
            log.warning("cannot tell the cache which content the folder holds: %s", exc)
        report = ReconcileReport(
            files=len(found),
            unchanged=unchanged,
            hashed=len(hashed),
            ready=ready,
            queued=queued,
            removed=len(removed) + len(gone),
            seconds=time.monotonic() - started,
        )
        log.info(
            "reconciled %d files in %.3fs: %d unchanged, %d hashed, %d ready from cache, %d queued, %d removed",
            report.files, report.seconds, report.unchanged, report.hashed, report.ready, report.queued, report.removed,
        )
        return report, recent

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

    def sync_path(self, path: str) -> None:
        """Look at one relative path again: new, changed, or gone. Called once the file is complete."""
        if not self.accepts(path):
            return
        full = self.root / path
        try:
            st = full.stat() if self.config.follow_symlinks else full.lstat()
        except FileNotFoundError:
            if not full.is_symlink():
                self._remove(path, reason="deleted")
                return
            st = full.lstat()  # a dangling symlink: _adopt reports it
        except OSError as exc:
            log.warning("cannot stat %s: %s", path, exc)
            return
        with self._lock:
            current = self._voices.get(path)
            if current is not None and _same_file(current, st) and current.state is not VoiceState.FAILED:
                return
        sha = self._known_sha(st)
        if sha is not None:
            self._record(path, st, sha)  # moved: same content under a new name, no need to re-hash
        self._adopt(path, st, sha)

    def remove_tree(self, prefix: str) -> None:
        """A folder left the voices folder (deleted or moved out): drop every voice below it."""
        prefix = prefix.rstrip("/") + "/"
        with self._lock:
            paths = [p for p in self._voices if p.startswith(prefix)]
        for path in paths:
            self._remove(path, reason="folder removed")

    def sync_tree(self, prefix: str) -> None:
        """A folder arrived or changed: look at every file below it, and at voices no longer there."""
        base = self.root / prefix
        with self._lock:
            known = [p for p in self._voices if p.startswith(prefix.rstrip("/") + "/")]
        for path in known:
            self.sync_path(path)
        for path in self._walk(base).keys():
            self.sync_path(path)

    # ------------------------------------------------------------------ internals: bookkeeping

    def _walk(self, base: Path | None = None) -> dict[str, os.stat_result]:
        """Every candidate file below ``base`` (default: the folder), by relative path."""
        found: dict[str, os.stat_result] = {}
        start = base or self.root
        root_str = str(self.root)
        stack = [str(start)]
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

    def _known_sha(self, st: os.stat_result) -> str | None:
        """The hash of a file we saw before under another name (a move keeps inode, size and mtime)."""
        with self._lock:
            for voice in self._voices.values():
                if voice.sha256 and _same_file(voice, st):
                    return voice.sha256
        return None

    def _adopt(self, path: str, st: os.stat_result, sha: str | None, *, announce: bool = True) -> str:
        """Take a new or changed file in: ready at once if the cache has all it needs, else queue it."""
        name = voice_name(path)
        with self._lock:
            owner = self._owner_of_name.get(name)
            voice = self._voices.get(path)
            if voice is None:
                voice = Voice(path=path, name=name)
                self._voices[path] = voice
            voice.generation += 1
            voice.size, voice.mtime_ns, voice.inode = st.st_size, st.st_mtime_ns, st.st_ino
            voice.sha256, voice.error, voice.note, voice.stage = sha, None, None, None
            voice.changed_at = time.monotonic()
            if owner is not None and owner != path and owner in self._voices:
                self._fail_locked(voice, f"voice name {name!r} is already taken by {owner}")
                outcome = "failed"
            else:
                self._owner_of_name[name] = path
                if sha is not None and self._ready_from_cache_locked(voice, sha):
                    self._changed.notify_all()
                    outcome = "ready"
                else:
                    voice.state = VoiceState.PENDING
                    self._enqueue_locked(_Job(path, voice.generation))
                    outcome = "queued"
            event = voice.to_dict()
        if outcome == "ready":
            log.log(logging.INFO if announce else logging.DEBUG, "voice ready: %s (from cache)", name, extra={"voice": name})
            self._emit("ready", event)
            self._queue_background_if_needed(path)
        elif outcome == "failed":
            log.warning("voice failed: %s: %s", name, event.get("error"), extra={"voice": name})
            self._emit("failed", event)
        return outcome

    def _ready_from_cache_locked(self, voice: Voice, sha: str) -> bool:
        meta = self.results.meta((sha, self.encoder_producer, self.embedding_kind))
        if meta is None:
            return False
        stage = None
        if self.engine is not None:
            for candidate in self.engine.stages:
                key = (sha, self.engine_producer or "", candidate)
                if self.results.has(key):
                    stage = candidate
            if stage is None:
                return False
        voice.state = VoiceState.READY
        voice.stage = stage
        voice.sha256 = sha
        _apply_meta(voice, meta)
        return True

    def _queue_background_if_needed(self, path: str) -> None:
        with self._lock:
            voice = self._voices.get(path)
            if voice is None or self.engine is None or voice.state is not VoiceState.READY:
                return
            if voice.stage != self.engine.stages[-1]:
                self._enqueue_locked(_Job(path, voice.generation, background=True))

    def _enqueue_locked(self, job: _Job) -> None:
        key = (job.path, job.background)
        if key in self._queued:
            # the queued job will read the newest generation when it runs
            return
        self._queued.add(key)
        (self._background if job.background else self._urgent).append(job)
        self._work.notify_all()

    def _remove(self, path: str, *, reason: str) -> None:
        with self._lock:
            voice = self._voices.pop(path, None)
            if voice is None:
                return
            if self._owner_of_name.get(voice.name) == path:
                del self._owner_of_name[voice.name]
            # a file waiting for this name (same name, other extension) can have it now
            contenders = [p for p, v in self._voices.items() if v.name == voice.name]
            self._changed.notify_all()
            event = voice.to_dict()
        try:
            self.files.forget([path])
        except CacheError as exc:
            log.warning("cannot forget %s in the cache: %s", path, exc)
        log.info("voice removed: %s (%s)", voice.name, reason, extra={"voice": voice.name})
        self._emit("removed", event)
        for contender in contenders:
            self.sync_path(contender)

    def _fail_locked(self, voice: Voice, reason: str) -> None:
        voice.state = VoiceState.FAILED
        voice.error = reason
        voice.stage = None
        self._changed.notify_all()

    def _emit(self, event: str, voice: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, voice)
            except Exception:  # a listener's bug must not stop preparation
                log.exception("voice %s listener failed", event)

    # ------------------------------------------------------------------ internals: the worker

    def _demanded(self) -> bool:
        try:
            return bool(self._external_demand())
        except Exception:  # a broken demand callback must not stop preparation
            log.exception("demand check failed")
            return False

    def _run_worker(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._urgent and (not self._background or self._demanded()):
                    # background stages wait while requests are being served (checked every 100 ms)
                    self._work.wait(0.1 if self._background else None)
                if self._stopping:
                    return
                job = (self._urgent or self._background).popleft()
                self._queued.discard((job.path, job.background))
                self._busy_path = job.path
            try:
                if job.background:
                    self._prepare_background(job.path)
                else:
                    self._prepare(job.path)
            except Exception:  # keep the worker alive whatever one file does
                log.exception("unexpected error preparing %s", job.path)
                with self._lock:
                    voice = self._voices.get(job.path)
                    if voice is not None and job.background:
                        # the voice stays usable at the stage it reached
                        voice.note = f"stage after {voice.stage} failed (see the daemon log)"
                        self._changed.notify_all()
                    elif voice is not None:
                        self._fail_locked(voice, "internal error while preparing (see the daemon log)")
            finally:
                with self._lock:
                    self._busy_path = None
                    self._changed.notify_all()

    def _snapshot(self, path: str) -> Voice | None:
        with self._lock:
            voice = self._voices.get(path)
            return replace(voice) if voice else None

    def _commit(self, path: str, generation: int, update: Callable[[Voice], None]) -> Voice | None:
        """Apply ``update`` if the file did not change meanwhile; the updated copy, or None if stale."""
        with self._lock:
            voice = self._voices.get(path)
            if voice is None or voice.generation != generation:
                return None
            update(voice)
            self._changed.notify_all()
            return replace(voice)

    def _prepare(self, path: str) -> None:
        snap = self._snapshot(path)
        if snap is None:
            return
        gen = snap.generation
        full = self.root / path
        try:
            self._check_path(full)
            sha = snap.sha256 or sha256_file(full)
            st = full.stat()
        except FileNotFoundError:
            log.info("%s disappeared while being read", path)
            self.sync_path(path)
            return
        except PermissionError:
            self._finish_failed(path, gen, "permission denied: the daemon cannot read this file")
            return
        except AudioError as exc:
            self._finish_failed(path, gen, str(exc))
            return
        if snap.sha256 is None:
            self._record(path, st, sha)

        def hashed(voice: Voice) -> None:
            voice.sha256 = sha

        if self._commit(path, gen, hashed) is None:
            return
        with self._lock:
            voice = self._voices.get(path)
            if voice is not None and voice.generation == gen and self._ready_from_cache_locked(voice, sha):
                event = voice.to_dict()
                self._changed.notify_all()
            else:
                event = None
        if event is not None:
            log.info("voice ready: %s (from cache)", event["name"], extra={"voice": event["name"]})
            self._emit("ready", event)
            self._queue_background_if_needed(path)
            return

        preparing = self._commit(path, gen, lambda v: setattr(v, "state", VoiceState.PREPARING))
        if preparing is None:
            return
        self._emit("preparing", preparing.to_dict())
        started = time.monotonic()
        try:
            audio = load_audio(full, max_duration_s=self.config.max_duration_s)
            if audio.duration_s < self.config.min_duration_s:
                raise AudioError(
                    f"too short: {audio.duration_s:.2f}s, the minimum is {self.config.min_duration_s:g}s"
                )
            voiced = voiced_fraction(audio.samples, audio.sample_rate)
            if voiced < MIN_VOICED_FRACTION:
                raise AudioError(
                    f"no voiced speech: {voiced:.0%} of the sound is voiced, at least {MIN_VOICED_FRACTION:.0%} "
                    "needed (noise, hum or whispering?)"
                )
            embedding = self.encoder.embed(audio.samples, preprocess=self.preprocess)
        except FileNotFoundError:
            log.info("%s disappeared while being read", path)
            self.sync_path(path)
            return
        except AudioError as exc:
            self._finish_failed(path, gen, str(exc))
            return
        meta = audio_meta(audio)
        embed_s = time.monotonic() - started
        results = [(self.embedding_kind, self.encoder_producer, {"embedding": embedding}, meta)]

        stage = None
        if self.engine is not None:
            first = self.engine.stages[0]
            try:
                conditioning = self.engine.prepare_voice(
                    audio.samples, embedding, stage=first, previous=None, should_stop=None
                )
            except AudioError as exc:
                self._finish_failed(path, gen, str(exc))
                return
            results.append((first, self.engine_producer or "", conditioning, dict(getattr(conditioning, "meta", {}))))
            stage = first

        def ready(voice: Voice) -> None:
            voice.state = VoiceState.READY
            voice.stage = stage
            _apply_meta(voice, meta)

        # published first, stored right after: the voice is usable without waiting for the
        # cache's fsyncs, and lookups see the results in memory until they are on disk
        self.results.publish(sha, results)
        done = self._commit(path, gen, ready)
        if done is None:
            log.info("%s changed while being prepared; result discarded", path)
            self.results.store_published(sha, results)
            return
        log.info(
            "voice ready: %s (%.1fs of audio, embedded in %.0f ms)%s",
            done.name, audio.duration_s, embed_s * 1000, f"; {done.note}" if done.note else "",
            extra={"voice": done.name},
        )
        self._emit("ready", done.to_dict())
        problem = self.results.store_published(sha, results)
        if problem:
            self._commit(path, gen, lambda v: setattr(v, "note", f"{v.note}; {problem}" if v.note else problem))
        self._queue_background_if_needed(path)

    def _prepare_background(self, path: str) -> None:
        """Later engine stages (e.g. refinement): they yield to urgent work and to requests."""
        snap = self._snapshot(path)
        if snap is None or self.engine is None or snap.sha256 is None or snap.state is not VoiceState.READY:
            return
        gen, sha = snap.generation, snap.sha256
        stages = self.engine.stages
        start = stages.index(snap.stage) + 1 if snap.stage in stages else 0
        if start >= len(stages):
            return
        arrays = self.results.arrays((sha, self.encoder_producer, self.embedding_kind))
        previous = self._conditioning(sha, stages[start - 1]) if start else None
        if arrays is None:
            self._enqueue_urgent_again(path)
            return
        try:
            audio = load_audio(self.root / path, max_duration_s=self.config.max_duration_s)
        except (AudioError, FileNotFoundError):
            self.sync_path(path)
            return

        def gone() -> bool:  # the daemon stops, or the file changed or went
            with self._lock:
                current = self._voices.get(path)
                return self._stopping or current is None or current.generation != gen

        def must_abandon() -> bool:
            with self._lock:
                urgent = bool(self._urgent)
            return urgent or gone()

        set_aside = False  # a stage paused too long: what the engine returns is not its result
        told_to_stop = False  # the engine was asked to give way: what it returns is not the stage's result

        def should_stop() -> bool:
            nonlocal set_aside, told_to_stop
            # While synthesis requests wait, the stage pauses here (the engine calls this between
            # steps) instead of being thrown away, or a daemon under steady load would restart it
            # for ever. It is abandoned for the daemon stopping, the file changing, new files
            # (their first stage runs on this thread) and after _MAX_PAUSE_S of pausing.
            if set_aside:
                return True
            paused_at: float | None = None
            quiet_since: float | None = None
            while not must_abandon():
                now = time.monotonic()
                if self._demanded():
                    quiet_since = None
                    if paused_at is None:
                        log.debug("stage of %s paused for requests", path)
                        paused_at = now
                    elif now - paused_at > _MAX_PAUSE_S:
                        log.info("background stage of %s set aside after %.0fs of waiting requests; it runs again later",
                                 path, _MAX_PAUSE_S)
                        set_aside = True
                        return True
                elif paused_at is None:
                    return False
                else:  # resume only after a quiet spell: a step started in a gap between requests
                    quiet_since = now if quiet_since is None else quiet_since  # would slow the next one
                    if now - quiet_since >= _RESUME_QUIET_S:
                        log.debug("stage of %s resumes after %.1fs", path, now - paused_at)
                        return False
                with self._work:
                    self._work.wait(_PAUSE_POLL_S)  # woken at once by new files and by stop()
            told_to_stop = True
            return True

        stage = stages[start]  # one stage per turn: the next one queues behind the other voices'

        def progress(done: float) -> None:
            with self._lock:
                voice = self._voices.get(path)
                if voice is not None and voice.generation == gen:
                    voice.progress = (stage, float(done))

        extra: dict[str, Any] = {}
        if self._engine_reports_progress:
            extra["progress"] = progress
            progress(0.0)
        try:
            conditioning = self.engine.prepare_voice(
                audio.samples, arrays["embedding"], stage=stage, budget_s=self.stage_budget_s,
                previous=previous, should_stop=should_stop, **extra,
            )
        finally:
            with self._lock:
                voice = self._voices.get(path)
                if voice is not None:
                    voice.progress = None
        if set_aside or told_to_stop or gone():
            # the engine returned early to make way: what it has is not the stage's result;
            # run the stage again later (it is deterministic, so nothing is lost but time).
            # A stage that never asked (quick) keeps its result even if new files came meanwhile.
            with self._lock:
                voice = self._voices.get(path)
                if voice is not None and voice.generation == gen and not self._stopping:
                    self._enqueue_locked(_Job(path, gen, background=True))
            log.debug("stage %s of %s gave way to more urgent work", stage, path)
            return
        meta = dict(getattr(conditioning, "meta", {}))
        # as for the first stage: usable from memory if the cache refuses it
        result = [(stage, self.engine_producer or "", conditioning, meta)]
        self.results.publish(sha, result)
        self.results.store_published(sha, result)
        done = self._commit(path, gen, lambda v: setattr(v, "stage", stage))
        if done is None:
            return
        log.info("voice %s reached stage %s", done.name, stage, extra={"voice": done.name})
        self._emit("stage", done.to_dict())
        # at the back of the line: of a folder of new voices, every one reaches a stage before any
        # of them starts the next, costlier one
        self._queue_background_if_needed(path)

    def _enqueue_urgent_again(self, path: str) -> None:
        with self._lock:
            voice = self._voices.get(path)
            if voice is not None:
                voice.state = VoiceState.PENDING
                self._enqueue_locked(_Job(path, voice.generation))

    def _check_path(self, full: Path) -> None:
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

    def _record(self, path: str, st: os.stat_result, sha: str) -> None:
        record = FileRecord(path, st.st_size, st.st_mtime_ns, st.st_ino, sha)
        try:
            self.files.record([record])
        except CacheError as exc:
            log.warning("cannot record %s in the cache index: %s", path, exc)
            with self._lock:
                self._unrecorded[path] = record
        else:
            with self._lock:
                self._unrecorded.pop(path, None)

    def retry_unsaved(self) -> int:
        """Store results a full or read-only cache refused earlier; how many are stored now.

        Called periodically, so room made in the cache (or a remount read-write) is used without
        a restart. Results of content no voice has any more are dropped from memory instead.
        """
        with self._lock:
            present = {v.sha256 for v in self._voices.values() if v.sha256 is not None}
            # file records first: without one, stored content would count as unreferenced
            records = [r for p, r in self._unrecorded.items()
                       if (v := self._voices.get(p)) is not None and v.sha256 == r.sha256]
            self._unrecorded.clear()
        if records:
            try:
                self.files.record(records)
            except CacheError as exc:
                log.debug("still cannot record files: %s", exc)
                with self._lock:
                    for r in records:
                        self._unrecorded.setdefault(r.path, r)
                return 0
        stored, done = self.results.retry(present)
        if done:
            with self._lock:
                for voice in self._voices.values():
                    if voice.sha256 in done and voice.note and NOT_CACHED in voice.note:
                        kept = [part for part in voice.note.split("; ") if not part.startswith(NOT_CACHED)]
                        voice.note = "; ".join(kept) or None
        if stored:
            log.info("stored %d prepared results the cache had refused earlier", stored)
        return stored

    def _finish_failed(self, path: str, generation: int, reason: str) -> None:
        done = self._commit(path, generation, lambda v: self._fail_locked(v, reason))
        if done is not None:
            log.warning("voice failed: %s: %s", done.name, reason, extra={"voice": done.name})
            self._emit("failed", done.to_dict())



def _same_file(voice: Voice, st: os.stat_result) -> bool:
    return (voice.size, voice.mtime_ns, voice.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)


def _apply_meta(voice: Voice, meta: Mapping[str, Any]) -> None:
    voice.duration_s = meta.get("duration_s")
    if meta.get("truncated"):
        voice.note = f"only the first {meta.get('used_s', 0):.1f}s of {meta.get('duration_s', 0):.1f}s are used"


def _takes_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` can be called with the keyword ``name`` (named, or through **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
