"""Admission: which synthesis requests run now, wait for their voice, queue, or are turned away.

A request whose voice is ready is reserved for the leader itself when a synthesizer is free
(see :mod:`voiced.server.router`), else queued; a full queue answers ``busy`` at once. A
request for a voice that is not ready yet waits up to its ``wait_s``, re-checked on every turn
of the leader. Nothing here touches the socket: the server sends the replies.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from voiced.protocol import BUSY, VOICE_NOT_FOUND, VOICE_NOT_READY, ProtocolError, Reply, Synthesize


class Voices(Protocol):
    """What admission needs of the daemon's voice library."""

    def voices(self) -> list[dict[str, Any]]: ...

    def voice_for_synthesis(self, name: str) -> tuple[dict[str, Any], Any] | None:
        """(voice dict, conditioning) of a voice that can be spoken now; None if not (yet) ready.

        Raises ProtocolError for an unknown or failed voice."""
        ...


@dataclass
class Job:
    """One synthesis request on its way: where the reply goes, what to say, and its voice once found."""

    reply: Reply
    id: Any
    speech: Synthesize
    received: float
    deadline: float = math.inf
    voice: dict[str, Any] = field(default_factory=dict)
    conditioning: Any = None


class Admission:
    """The synthesis queue, bounded, and the requests waiting for a voice; thread-safe."""

    def __init__(self, voices: Voices, *, synthesizers: int, queue_size: int) -> None:
        self.voices = voices
        self.synthesizers = synthesizers
        self.queue_size = queue_size
        self.busy = 0  # requests turned away: queue full or shutting down
        self._lock = threading.Lock()
        self._running = 0  # synthesizers running a job, at most ``synthesizers``
        self._queue: deque[Job] = deque()
        self._waiting: list[Job] = []
        self._taken: Job | None = None  # reserved for the leader, which runs it once it hands the socket over
        self._accepting = True

    def stop_accepting(self) -> None:
        """New synthesis requests get ``busy`` from now on; those admitted go on."""
        self._accepting = False

    def depth(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._queue) + self._running

    def idle(self) -> bool:
        with self._lock:
            return not self._running and not self._queue and not self._waiting

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def admit(self, job: Job) -> None:
        """Queue (or reserve) ``job``, or park it until its voice is ready; raises ProtocolError to refuse it."""
        if not self._accepting:
            self.busy += 1
            raise ProtocolError(BUSY, "the daemon is shutting down")
        found = self._find_voice(job, time.monotonic())
        if found is None:
            if job.speech.wait_s <= 0:
                raise self._not_ready(job.speech.voice)
            job.deadline = time.monotonic() + job.speech.wait_s
            with self._lock:
                self._waiting.append(job)
            return
        job.voice, job.conditioning = found
        self._enqueue(job)

    def recheck(self) -> list[tuple[Job, ProtocolError]]:
        """Admit the waiting jobs whose voice is ready; returns those refused (timed out, failed, busy)."""
        if not self._waiting:
            return []
        refused: list[tuple[Job, ProtocolError]] = []
        now = time.monotonic()
        with self._lock:
            waiting, self._waiting = self._waiting, []
        still: list[Job] = []
        for job in waiting:
            try:
                found = self._find_voice(job, now)
                if found is not None:
                    job.voice, job.conditioning = found
                    self._enqueue(job)
                elif now >= job.deadline:
                    raise self._not_ready(job.speech.voice)
                else:
                    still.append(job)
            except ProtocolError as exc:
                refused.append((job, exc))
        with self._lock:
            self._waiting.extend(still)
        return refused

    def take(self) -> Job | None:
        """The leader's next job: the one reserved for it, else a queued one when a synthesizer is free."""
        with self._lock:
            job, self._taken = self._taken, None
            if job is None and self._queue and self._running < self.synthesizers:
                job = self._queue.popleft()
                self._running += 1
            return job

    def next(self, *, drop: bool = False) -> Job | None:
        """A synthesizer finished a job: the next queued one for it, or None (it is free again).

        ``drop``: the server is stopping; queued jobs are forgotten."""
        with self._lock:
            if drop:
                self._queue.clear()
            if self._queue:
                return self._queue.popleft()
            self._running -= 1
            return None

    def _find_voice(self, job: Job, now: float) -> tuple[dict[str, Any], Any] | None:
        """The voice if it can be spoken; None to keep waiting (a file just dropped may not be known yet)."""
        try:
            return self.voices.voice_for_synthesis(job.speech.voice)
        except ProtocolError as exc:
            if exc.code == VOICE_NOT_FOUND and job.speech.wait_s and now < job.deadline:
                return None
            raise

    def _not_ready(self, name: str) -> ProtocolError:
        voice = next((v for v in self.voices.voices() if v["name"] == name), None)
        state = voice["state"] if voice else "pending"
        return ProtocolError(VOICE_NOT_READY, f"voice {name!r} is {state}; ask again later or pass wait_s", state=state)

    def _enqueue(self, job: Job) -> None:
        """Reserve the job for the leader when a synthesizer is free, else queue it (or ``busy``)."""
        with self._lock:
            if self._running < self.synthesizers and self._taken is None:
                self._running += 1
                self._taken = job
                return
            if len(self._queue) >= self.queue_size:
                self.busy += 1
                raise ProtocolError(BUSY, f"{self.queue_size} synthesis requests are already waiting")
            self._queue.append(job)
