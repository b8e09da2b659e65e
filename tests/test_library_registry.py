"""Tests of voiced.library.registry: voices by path and by name, and their states."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from voiced.library.registry import Cached, Registry
from voiced.library.voice import VoiceState


def stat_of(tmp_path: Path, name: str, content: bytes = b"x") -> os.stat_result:
    path = tmp_path / name
    path.write_bytes(content)
    return path.stat()


def test_adopt_is_pending_without_results_and_ready_with_them(tmp_path: Path) -> None:
    registry = Registry()
    st = stat_of(tmp_path, "a.wav")
    outcome, voice = registry.adopt("en/a.wav", st, None, None)
    assert outcome == "queued" and voice.state is VoiceState.PENDING and voice.name == "en/a"
    outcome, voice = registry.adopt("en/a.wav", st, "ab" * 32, Cached("quick", {"duration_s": 4.5, "truncated": True,
                                                                              "used_s": 3.0}))
    assert outcome == "ready" and voice.state is VoiceState.READY and voice.stage == "quick"
    assert voice.generation == 2 and voice.duration_s == 4.5 and "first 3.0s of 4.5s" in (voice.note or "")
    assert registry.get("en/a") == voice and registry.counts()["ready"] == 1
    assert registry.unchanged("en/a.wav", st) and registry.sha_of(st) == "ab" * 32
    assert registry.paths("en") == ["en/a.wav"] and registry.paths("fr") == []


def test_a_name_belongs_to_its_first_file_until_that_one_goes(tmp_path: Path) -> None:
    registry = Registry()
    registry.adopt("alice.wav", stat_of(tmp_path, "1"), None, None)
    outcome, second = registry.adopt("alice.flac", stat_of(tmp_path, "2"), None, None)
    assert outcome == "failed" and "already taken by alice.wav" in (second.error or "")
    assert registry.get("alice").path == "alice.wav"  # type: ignore[union-attr]
    removed, contenders = registry.remove("alice.wav")
    assert removed is not None and removed.path == "alice.wav" and contenders == ["alice.flac"]
    outcome, second = registry.adopt("alice.flac", stat_of(tmp_path, "2"), None, None)
    assert outcome == "queued" and registry.get("alice").path == "alice.flac"  # type: ignore[union-attr]


def test_names_compare_in_any_unicode_form(tmp_path: Path) -> None:
    registry = Registry()
    registry.adopt("Rene\u0301e.wav", stat_of(tmp_path, "r"), None, None)  # decomposed, as macOS names it
    assert registry.get("Ren\u00e9e") is not None and registry.get("Rene\u0301e") is not None


def test_a_result_for_an_older_version_of_the_file_is_not_committed(tmp_path: Path) -> None:
    registry = Registry()
    _, first = registry.adopt("a.wav", stat_of(tmp_path, "a", b"1"), None, None)
    registry.adopt("a.wav", stat_of(tmp_path, "a", b"22"), None, None)  # changed meanwhile
    assert registry.commit("a.wav", first.generation, lambda v: setattr(v, "state", VoiceState.READY)) is None
    assert registry.snapshot("a.wav").state is VoiceState.PENDING  # type: ignore[union-attr]
    assert not registry.is_current("a.wav", first.generation)
    assert registry.commit("gone.wav", 1, lambda v: None) is None


def test_lost_results_keep_a_voice_at_the_stage_still_there(tmp_path: Path) -> None:
    registry = Registry()
    _, voice = registry.adopt("a.wav", stat_of(tmp_path, "a"), "cd" * 32, Cached("refined", {}))
    assert registry.lost(voice, "quick") and registry.snapshot("a.wav").stage == "quick"  # type: ignore[union-attr]
    assert registry.lost(registry.snapshot("a.wav"), None)  # type: ignore[arg-type]
    assert registry.snapshot("a.wav").state is VoiceState.PENDING  # type: ignore[union-attr]
    assert not registry.lost(voice, None)  # no longer ready: nothing to do


def test_waiters_wake_at_a_change(tmp_path: Path) -> None:
    registry = Registry()
    st = stat_of(tmp_path, "a")
    timer = threading.Timer(0.2, lambda: registry.adopt("a.wav", st, "ef" * 32, Cached(None, {})))
    timer.start()
    started = time.monotonic()
    assert registry.wait_for(lambda: registry.counts()["ready"] == 1, 10.0)
    assert time.monotonic() - started < 5.0  # woken by the change, not by the timeout
    assert not registry.wait_for(lambda: registry.counts()["failed"] == 1, 0.1)
    timer.join()


def test_notes_of_stored_content_are_cleared(tmp_path: Path) -> None:
    registry = Registry()
    _, voice = registry.adopt("a.wav", stat_of(tmp_path, "a"), "01" * 32, Cached(None, {}))
    registry.commit("a.wav", voice.generation, lambda v: setattr(v, "note", "kept; not cached (disk full)"))
    registry.clear_note({"01" * 32}, "not cached")
    assert registry.snapshot("a.wav").note == "kept"  # type: ignore[union-attr]
