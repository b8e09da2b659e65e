"""The registry: which voices the library has, by path and by name, and the state of each.

Every change of a voice goes through here, under one lock, and wakes whoever waits for a state
(``wait_for``). Callers get copies: the worker reads a snapshot, works without the lock, and
commits its result only if the file did not change meanwhile (the voice's generation).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

from voiced.library.voice import Voice, VoiceState, normalize_name, voice_name

Outcome = Literal["ready", "queued", "failed"]


@dataclass(frozen=True)
class Cached:
    """What the store already has for some content: the engine stage reached (None without an
    engine) and the reference's metadata."""

    stage: str | None
    meta: Mapping[str, Any]


class Registry:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._voices: dict[str, Voice] = {}
        self._owner_of_name: dict[str, str] = {}

    # ------------------------------------------------------------------ queries

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [v.to_dict() for v in sorted(self._voices.values(), key=lambda v: v.name)]

    def get(self, name: str) -> Voice | None:
        """A copy of the voice called ``name`` (looked up, never joined onto a path; in any Unicode form)."""
        with self._lock:
            path = self._owner_of_name.get(normalize_name(name))
            voice = self._voices.get(path) if path is not None else None
            return replace(voice) if voice else None

    def snapshot(self, path: str) -> Voice | None:
        """A copy of the voice of the file at ``path``."""
        with self._lock:
            voice = self._voices.get(path)
            return replace(voice) if voice else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {state.value: 0 for state in VoiceState}
            for voice in self._voices.values():
                out[voice.state.value] += 1
            return out

    def paths(self, prefix: str = "") -> list[str]:
        """The files with a voice, those below the folder ``prefix`` when one is given."""
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        with self._lock:
            return [p for p in self._voices if p.startswith(prefix)]

    def contents(self) -> set[str]:
        """The content hashes the voices have."""
        with self._lock:
            return {v.sha256 for v in self._voices.values() if v.sha256 is not None}

    def is_current(self, path: str, generation: int) -> bool:
        """Whether the file at ``path`` is still the one of ``generation``."""
        with self._lock:
            voice = self._voices.get(path)
            return voice is not None and voice.generation == generation

    def unchanged(self, path: str, st: os.stat_result, *, failed_too: bool = True) -> bool:
        """Whether the file at ``path`` is the one the voice was made from (size, mtime, inode)."""
        with self._lock:
            voice = self._voices.get(path)
            return (voice is not None and same_file(voice, st)
                    and (failed_too or voice.state is not VoiceState.FAILED))

    def sha_of(self, st: os.stat_result) -> str | None:
        """The hash of a file seen before under another name (a move keeps inode, size and mtime)."""
        with self._lock:
            for voice in self._voices.values():
                if voice.sha256 and same_file(voice, st):
                    return voice.sha256
        return None

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (re-checked at every change) or the timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    # ------------------------------------------------------------------ changes

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Hold the registry across a change and what goes with it (queueing the voice's work),
        so that no waiter sees the one without the other; waiters are woken at the end."""
        with self._lock:
            try:
                yield
            finally:
                self._changed.notify_all()

    def touch(self) -> None:
        """Wake the waiters: something they may be waiting for changed outside the registry."""
        with self._changed:
            self._changed.notify_all()

    def adopt(self, path: str, st: os.stat_result, sha: str | None, cached: Cached | None) -> tuple[Outcome, Voice]:
        """A new or changed file: ready at once from ``cached``, failed if its name is taken, else
        pending (the caller queues it). Returns the outcome and a copy of the voice."""
        name = voice_name(path)
        with self.changing():
            owner = self._owner_of_name.get(name)
            voice = self._voices.get(path)
            if voice is None:
                voice = Voice(path=path, name=name)
                self._voices[path] = voice
            voice.generation += 1
            voice.size, voice.mtime_ns, voice.inode = st.st_size, st.st_mtime_ns, st.st_ino
            voice.sha256, voice.error, voice.note, voice.stage = sha, None, None, None
            voice.changed_at = time.monotonic()
            outcome: Outcome
            if owner is not None and owner != path and owner in self._voices:
                fail(voice, f"voice name {name!r} is already taken by {owner}")
                outcome = "failed"
            else:
                self._owner_of_name[name] = path
                if sha is not None and cached is not None:
                    make_ready(voice, sha, cached)
                    outcome = "ready"
                else:
                    voice.state = VoiceState.PENDING
                    outcome = "queued"
            return outcome, replace(voice)

    def commit(self, path: str, generation: int, update: Callable[[Voice], None]) -> Voice | None:
        """Apply ``update`` if the file did not change meanwhile; the updated copy, or None if stale."""
        with self.changing():
            voice = self._voices.get(path)
            if voice is None or voice.generation != generation:
                return None
            update(voice)
            return replace(voice)

    def update(self, path: str, update: Callable[[Voice], None]) -> Voice | None:
        """Apply ``update`` to whatever voice the file at ``path`` has now; its copy, or None."""
        with self.changing():
            voice = self._voices.get(path)
            if voice is None:
                return None
            update(voice)
            return replace(voice)

    def remove(self, path: str) -> tuple[Voice | None, list[str]]:
        """Drop the voice of ``path``: the voice, and the files waiting for its name (same name,
        another extension), which can have it now."""
        with self.changing():
            voice = self._voices.pop(path, None)
            if voice is None:
                return None, []
            if self._owner_of_name.get(voice.name) == path:
                del self._owner_of_name[voice.name]
            return voice, [p for p, v in self._voices.items() if v.name == voice.name]

    def lost(self, seen: Voice, reached: str | None) -> bool:
        """The store lost results of a ready voice: it stays ready at ``reached``, the stage still
        there, or goes back to pending without one. False if the voice changed meanwhile."""
        with self.changing():
            voice = self._voices.get(seen.path)
            if voice is None or voice.generation != seen.generation or voice.state is not VoiceState.READY:
                return False
            if reached is not None:
                voice.stage = reached
            else:
                voice.state, voice.stage = VoiceState.PENDING, None
            return True

    def clear_note(self, shas: set[str], prefix: str) -> None:
        """Drop the parts of voices' notes that begin with ``prefix``, for content in ``shas``."""
        with self.changing():
            for voice in self._voices.values():
                if voice.sha256 in shas and voice.note and prefix in voice.note:
                    kept = [part for part in voice.note.split("; ") if not part.startswith(prefix)]
                    voice.note = "; ".join(kept) or None


def same_file(voice: Voice, st: os.stat_result) -> bool:
    return (voice.size, voice.mtime_ns, voice.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)


def fail(voice: Voice, reason: str) -> None:
    voice.state = VoiceState.FAILED
    voice.error = reason
    voice.stage = None


def make_ready(voice: Voice, sha: str, cached: Cached) -> None:
    voice.state = VoiceState.READY
    voice.stage = cached.stage
    voice.sha256 = sha
    apply_meta(voice, cached.meta)


def apply_meta(voice: Voice, meta: Mapping[str, Any]) -> None:
    voice.duration_s = meta.get("duration_s")
    if meta.get("truncated"):
        voice.note = f"only the first {meta.get('used_s', 0):.1f}s of {meta.get('duration_s', 0):.1f}s are used"
