"""The preparer: worker threads that turn recordings into prepared voices.

A new or changed file is urgent: hash -> checks -> speaker embedding -> the engine's first
stage, after which its voice is ready. Later stages (refinement) are background work: one stage
per turn, behind every other voice's, and while synthesis requests wait they pause between
steps instead of being thrown away. The worker reads a voice's snapshot from the registry and
commits its result there only if the file did not change meanwhile (its generation).

One worker does everything on the daemon's own machine. Where stages run elsewhere (a
cluster's preparation replicas), there are more: all but one may run background stages at
once, and the one left keeps new files urgent, so a stage no longer gives way to them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


from voiced.audio import load_audio, voiced_fraction
from voiced.config import VoicesConfig
from voiced.embedding import audio_meta
from voiced.engines.base import Engine, SpeakerEncoder, reports_progress
from voiced.errors import AudioError
from voiced.fsutil import sha256_file
from voiced.library.files import FileRecord, FileRecords
from voiced.library.folder import Folder
from voiced.library.registry import Registry, apply_meta, fail, make_ready
from voiced.library.results import Prepared, Result
from voiced.library.voice import Voice, VoiceState

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

Emit = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class _Job:
    path: str
    background: bool = False


class Preparer:
    def __init__(
        self,
        *,
        config: VoicesConfig,
        registry: Registry,
        folder: Folder,
        files: FileRecords,
        prepared: Prepared,
        encoder: SpeakerEncoder,
        engine: Engine | None,
        preprocess: bool,
        stage_budget_s: float | None,
        emit: Emit,
        resync: Callable[[str], None],
        workers: int = 1,
    ) -> None:
        self.config = config
        self.registry, self.folder, self.files, self.prepared = registry, folder, files, prepared
        self.encoder, self.engine = encoder, engine
        self.preprocess, self.stage_budget_s = preprocess, stage_budget_s
        self._emit, self._resync = emit, resync  # resync: look at a file again (it went meanwhile)
        self._reports_progress = engine is not None and reports_progress(engine)
        # its own lock, taken inside the registry's (``Registry.changing``), never around it
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._urgent: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._queued: set[_Job] = set()
        self.workers = max(1, workers)
        # background stages running at once: one worker gives way to urgent work mid-stage;
        # several keep one worker free for it
        self._max_background = max(1, self.workers - 1)
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._busy: dict[int, _Job] = {}  # by thread: what each worker is at
        self._demand: Callable[[], bool] = lambda: False

    # ------------------------------------------------------------------ queue

    def enqueue(self, path: str, *, background: bool = False) -> None:
        """Queue work on a file; a job already queued reads the newest version when it runs."""
        job = _Job(path, background)
        with self._work:
            if job in self._queued:
                return
            self._queued.add(job)
            (self._background if background else self._urgent).append(job)
            self._work.notify_all()

    def follow_up(self, path: str) -> None:
        """Queue a ready voice's next engine stage, if it has one to reach."""
        with self.registry.changing():
            voice = self.registry.snapshot(path)
            if voice is None or self.engine is None or voice.state is not VoiceState.READY:
                return
            if voice.stage != self.engine.stages[-1]:
                self.enqueue(path, background=True)

    def depth(self) -> int:
        with self._lock:
            return len(self._urgent) + len(self._background) + len(self._busy)

    def set_demand(self, demand: Callable[[], bool]) -> None:
        """Background stages yield whenever ``demand()`` is true (e.g. synthesis requests queued)."""
        self._demand = demand

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._stopping = False
            self._threads = [threading.Thread(target=self._run, name=f"voiced-prepare-{i}", daemon=True)
                             for i in range(self.workers)]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("preparation worker still busy after %.1fs; leaving it", timeout)

    # ------------------------------------------------------------------ the worker

    def _demanded(self) -> bool:
        try:
            return bool(self._demand())
        except Exception:  # a broken demand callback must not stop preparation
            log.exception("demand check failed")
            return False

    def _next_background(self) -> _Job | None:
        """The background job a worker may start now, if any (called holding the lock): not
        while requests wait, not past the limit, and not on a voice another worker is at."""
        if not self._background or self._demanded():
            return None
        busy = list(self._busy.values())
        if sum(job.background for job in busy) >= self._max_background:
            return None
        paths = {job.path for job in busy}
        return next((job for job in self._background if job.path not in paths), None)

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            with self._work:
                while True:
                    if self._stopping:
                        return
                    job = self._urgent.popleft() if self._urgent else self._next_background()
                    if job is not None:
                        break
                    # background stages wait while requests are being served (checked every 100 ms)
                    self._work.wait(0.1 if self._background else None)
                if job.background:
                    self._background.remove(job)
                self._queued.discard(job)
                self._busy[me] = job
            try:
                if job.background:
                    self._prepare_background(job.path)
                else:
                    self._prepare(job.path)
            except Exception:  # keep the worker alive whatever one file does
                log.exception("unexpected error preparing %s", job.path)
                if job.background:  # the voice stays usable at the stage it reached
                    self.registry.update(job.path, lambda v: setattr(
                        v, "note", f"stage after {v.stage} failed (see the daemon log)"))
                else:
                    self.registry.update(job.path, lambda v: fail(
                        v, "internal error while preparing (see the daemon log)"))
            finally:
                with self._work:
                    self._busy.pop(me, None)
                    self._work.notify_all()  # a background stage may start now
                self.registry.touch()

    def _prepare(self, path: str) -> None:
        snap = self.registry.snapshot(path)
        if snap is None:
            return
        gen = snap.generation
        full = self.folder.root / path
        try:
            self.folder.check(path)
            sha = snap.sha256 or sha256_file(full)
            st = full.stat()
        except FileNotFoundError:
            log.info("%s disappeared while being read", path)
            self._resync(path)
            return
        except PermissionError:
            self._finish_failed(path, gen, "permission denied: the daemon cannot read this file")
            return
        except AudioError as exc:
            self._finish_failed(path, gen, str(exc))
            return
        if snap.sha256 is None:
            self.files.record_or_keep([FileRecord(path, st.st_size, st.st_mtime_ns, st.st_ino, sha)])

        cached = self.prepared.cached(sha)

        def hashed(voice: Voice) -> None:
            voice.sha256 = sha
            if cached is not None:
                make_ready(voice, sha, cached)

        known = self.registry.commit(path, gen, hashed)
        if known is None:
            return
        if cached is not None:
            log.info("voice ready: %s (from cache)", known.name, extra={"voice": known.name})
            self._emit("ready", known.to_dict())
            self.follow_up(path)
            return

        preparing = self.registry.commit(path, gen, lambda v: setattr(v, "state", VoiceState.PREPARING))
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
            self._resync(path)
            return
        except AudioError as exc:
            self._finish_failed(path, gen, str(exc))
            return
        meta = audio_meta(audio)
        embed_s = time.monotonic() - started
        results: list[Result] = [(self.prepared.embedding_kind, self.prepared.encoder, {"embedding": embedding}, meta)]

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
            results.append((first, self.prepared.engine or "", conditioning, dict(getattr(conditioning, "meta", {}))))
            stage = first

        def ready(voice: Voice) -> None:
            voice.state = VoiceState.READY
            voice.stage = stage
            apply_meta(voice, meta)

        # published first, stored right after: the voice is usable without waiting for the
        # store's fsyncs, and lookups see the results in memory until they are on disk
        results_store = self.prepared.results
        results_store.publish(sha, results)
        done = self.registry.commit(path, gen, ready)
        if done is None:
            log.info("%s changed while being prepared; result discarded", path)
            results_store.store_published(sha, results)
            return
        log.info(
            "voice ready: %s (%.1fs of audio, embedded in %.0f ms)%s",
            done.name, audio.duration_s, embed_s * 1000, f"; {done.note}" if done.note else "",
            extra={"voice": done.name},
        )
        self._emit("ready", done.to_dict())
        problem = results_store.store_published(sha, results)
        if problem:
            self.registry.commit(path, gen, lambda v: setattr(v, "note", f"{v.note}; {problem}" if v.note else problem))
        self.follow_up(path)

    def _prepare_background(self, path: str) -> None:
        """Later engine stages (e.g. refinement): they yield to urgent work and to requests."""
        snap = self.registry.snapshot(path)
        if snap is None or self.engine is None or snap.sha256 is None or snap.state is not VoiceState.READY:
            return
        gen, sha = snap.generation, snap.sha256
        stages = self.engine.stages
        start = stages.index(snap.stage) + 1 if snap.stage in stages else 0
        if start >= len(stages):
            return
        embedding = self.prepared.embedding(sha)
        previous = self.prepared.conditioning(sha, stages[start - 1]) if start else None
        if embedding is None:  # the store lost it: prepare the voice again from the start
            with self.registry.changing():
                if self.registry.update(path, lambda v: setattr(v, "state", VoiceState.PENDING)) is not None:
                    self.enqueue(path)
            return
        try:
            audio = load_audio(self.folder.root / path, max_duration_s=self.config.max_duration_s)
        except (AudioError, FileNotFoundError):
            self._resync(path)
            return

        def gone() -> bool:  # the daemon stops, or the file changed or went
            return self._stopping or not self.registry.is_current(path, gen)

        def must_abandon() -> bool:
            with self._lock:  # with one worker, new files' first stages would wait behind this
                urgent = bool(self._urgent) and self.workers == 1
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
            self.registry.commit(path, gen, lambda v: setattr(v, "progress", (stage, float(done))))

        extra: dict[str, Any] = {}
        if self._reports_progress:
            extra["progress"] = progress
            progress(0.0)
        try:
            conditioning = self.engine.prepare_voice(
                audio.samples, embedding, stage=stage, budget_s=self.stage_budget_s,
                previous=previous, should_stop=should_stop, **extra,
            )
        finally:
            self.registry.update(path, lambda v: setattr(v, "progress", None))
        if set_aside or told_to_stop or gone():
            # the engine returned early to make way: what it has is not the stage's result;
            # run the stage again later (it is deterministic, so nothing is lost but time).
            # A stage that never asked (quick) keeps its result even if new files came meanwhile.
            with self.registry.changing():
                if self.registry.is_current(path, gen) and not self._stopping:
                    self.enqueue(path, background=True)
            log.debug("stage %s of %s gave way to more urgent work", stage, path)
            return
        meta = dict(getattr(conditioning, "meta", {}))
        # as for the first stage: usable from memory if the store refuses it
        result: list[Result] = [(stage, self.prepared.engine or "", conditioning, meta)]
        self.prepared.results.publish(sha, result)
        self.prepared.results.store_published(sha, result)
        done = self.registry.commit(path, gen, lambda v: setattr(v, "stage", stage))
        if done is None:
            return
        log.info("voice %s reached stage %s", done.name, stage, extra={"voice": done.name})
        self._emit("stage", done.to_dict())
        # at the back of the line: of a folder of new voices, every one reaches a stage before any
        # of them starts the next, costlier one
        self.follow_up(path)

    def _finish_failed(self, path: str, generation: int, reason: str) -> None:
        done = self.registry.commit(path, generation, lambda v: fail(v, reason))
        if done is not None:
            log.warning("voice failed: %s: %s", done.name, reason, extra={"voice": done.name})
            self._emit("failed", done.to_dict())

