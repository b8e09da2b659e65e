"""The voice library with a real watched folder, a real cache and the real speaker encoder.

Every test drives the folder the way users and their tools do (cp, mv, editors' save by
rename, rsync's hidden temp file, slow writers) and waits on the library's state changes
with timeouts, never on fixed sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import soundfile as sf

from voiced.store import LocalStore
from voiced.config import VoicesConfig
from voiced.fsutil import sha256_file
from voiced.library import Library
from voiced.watcher import FolderWatcher

TIMEOUT = 30.0


class CountingEncoder:
    """The real encoder, counting its calls; ``gate`` lets a test hold an embedding mid-way."""

    def __init__(self, encoder: Any) -> None:
        self.inner = encoder
        self.model_id = encoder.model_id
        self.version = encoder.version
        self.calls = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def embed(self, wav: np.ndarray, *, preprocess: bool = True) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(TIMEOUT)
        return self.inner.embed(wav, preprocess=preprocess)


class Folder:
    """A watched voices folder with its cache, library and watcher, and a log of voice events."""

    def __init__(self, root: Path, encoder: Any, **overrides: Any) -> None:
        self.root = root
        self.voices = root / "voices"
        self.voices.mkdir(exist_ok=True)
        self.cache_dir = root / "cache"
        settings = {"dir": self.voices, "settle_s": 0.3, "min_duration_s": 1.0, "rename_grace_s": 0.0, **overrides}
        self.config = VoicesConfig(**settings)
        self.encoder = CountingEncoder(encoder)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._event_added = threading.Condition()
        self.cache: LocalStore | None = None
        self.library: Library | None = None
        self.watcher: FolderWatcher | None = None

    def start(self) -> "Folder":
        self.cache = LocalStore(self.cache_dir)
        self.library = Library(self.config, self.cache, self.encoder, listeners=[self._record])
        self.library.start()
        self.watcher = FolderWatcher(self.library, self.config)
        self.watcher.start()
        return self

    def stop(self) -> None:
        if self.watcher:
            self.watcher.stop()
        if self.library:
            self.library.stop()
        if self.cache:
            self.cache.close()
        self.watcher = self.library = self.cache = None

    def _record(self, event: str, voice: dict[str, Any]) -> None:
        with self._event_added:
            self.events.append((event, voice))
            self._event_added.notify_all()

    def wait_event(self, event: str, name: str) -> dict[str, Any]:
        """The listener runs just after the state changes: wait for it, not only for the state."""

        def find() -> dict[str, Any] | None:
            return next((v for e, v in self.events if e == event and v["name"] == name), None)

        with self._event_added:
            if not self._event_added.wait_for(lambda: find() is not None, TIMEOUT):
                raise AssertionError(f"no {event} event for {name}: {self.events}")
            found = find()
        assert found is not None
        return found

    def voice(self, name: str) -> dict[str, Any] | None:
        assert self.library is not None
        for v in self.library.voices():
            if v["name"] == name:
                return v
        return None

    def wait_state(self, name: str, state: str, **fields: Any) -> dict[str, Any]:
        assert self.library is not None

        def ok() -> bool:
            v = self.voice(name)
            return v is not None and v["state"] == state and all(v.get(k) == val for k, val in fields.items())

        if not self.library.wait_for(ok, TIMEOUT):
            raise AssertionError(f"{name} never became {state} {fields}; now {self.voice(name)}; all {self.library.voices()}")
        voice = self.voice(name)
        assert voice is not None
        return voice

    def wait_gone(self, name: str) -> None:
        assert self.library is not None
        if not self.library.wait_for(lambda: self.voice(name) is None, TIMEOUT):
            raise AssertionError(f"{name} still listed: {self.voice(name)}")

    def wait_idle(self) -> None:
        assert self.library is not None and self.watcher is not None
        lib, watcher = self.library, self.watcher
        assert lib.wait_for(lambda: lib.queue_depth() == 0 and watcher.pending_settle() == 0, TIMEOUT)


@pytest.fixture
def folder(tmp_path: Path, speaker_encoder: Any) -> Iterator[Folder]:
    f = Folder(tmp_path, speaker_encoder)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def clips(testdata_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in (testdata_dir / "voices").iterdir()}


def copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


# ---------------------------------------------------------------------------- the happy paths


def test_copy_in_becomes_ready_and_delete_evicts(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    copy(clips["allison_a"], folder.voices / "allison.wav")
    voice = folder.wait_state("allison", "ready")
    sha = sha256_file(clips["allison_a"])
    assert voice["sha256"] == sha
    assert voice["file"] == "allison.wav"
    assert abs(voice["duration_s"] - 12.0) < 0.1
    folder.wait_idle()  # ready is published first, then stored
    assert folder.cache is not None and folder.cache.entries_for(sha)
    embedding = folder.library.embedding("allison") if folder.library else None
    assert embedding is not None and embedding.shape == (256,)
    assert abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-4

    (folder.voices / "allison.wav").unlink()
    folder.wait_gone("allison")
    folder.wait_event("removed", "allison")
    assert [e for e, v in folder.events if v["name"] == "allison"] == ["preparing", "ready", "removed"]
    folder.cache.collect_garbage(0.0)
    assert folder.cache.entries_for(sha) == []


def test_subfolders_name_voices_by_relative_path(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    copy(clips["june_a"], folder.voices / "fr" / "june.wav")
    voice = folder.wait_state("fr/june", "ready")
    assert voice["file"] == "fr/june.wav"



def test_names_that_are_not_utf8_are_left_out_with_a_warning(
    folder: Folder, clips: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A Latin-1 name (bytes that are not UTF-8) can be neither indexed nor sent in a reply:
    it is ignored with one warning, at start-up and while running, and nothing else suffers."""
    def latin1(name: str) -> Path:
        return folder.voices / os.fsdecode(name.encode("latin-1"))

    copy(clips["june_a"], latin1("rené-old.wav"))  # there before the start
    copy(clips["carlo_a"], folder.voices / "carlo.wav")
    folder.start()
    folder.wait_state("carlo", "ready")
    copy(clips["june_b"], latin1("rené-new.wav"))  # arrives while watched
    os.rename(folder.voices / "carlo.wav", latin1("carló.wav"))  # a known file renamed to one
    folder.wait_gone("carlo")
    copy(clips["allison_a"], folder.voices / "after.wav")
    folder.wait_state("after", "ready")
    assert folder.library is not None
    voices = folder.library.voices()
    assert [v["name"] for v in voices] == ["after"]
    json.dumps(voices, ensure_ascii=False).encode("utf-8")  # what a reply does
    folder.stop()
    folder.start()  # and again at start-up, with all three there
    folder.wait_state("after", "ready")
    assert [v["name"] for v in folder.library.voices()] == ["after"]
    warned = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    for shown in ("ren\\xe9-old.wav", "ren\\xe9-new.wav", "carl\\xf3.wav"):
        assert len([m for m in warned if shown in m]) == 2, warned  # once per start


def test_names_match_in_any_unicode_form(folder: Folder, clips: dict[str, Path]) -> None:
    """A file named on macOS (decomposed accents, NFD) answers to the name as typed (NFC)."""
    nfc, nfd = unicodedata.normalize("NFC", "Renée"), unicodedata.normalize("NFD", "Renée")
    assert nfc != nfd
    folder.start()
    copy(clips["june_a"], folder.voices / f"{nfd}.wav")
    voice = folder.wait_state(nfc, "ready")
    assert voice["file"] == f"{nfd}.wav"  # the file keeps its own name
    assert folder.library is not None
    for typed in (nfc, nfd):
        found = folder.library.get(typed)
        assert found is not None and found.path == f"{nfd}.wav"
    # the same name in the other form is a second file claiming it
    copy(clips["allison_a"], folder.voices / f"{nfc}.flac")
    assert folder.library.wait_for(
        lambda: any(v["file"] == f"{nfc}.flac" and v["state"] == "failed" for v in folder.library.voices()), TIMEOUT
    )
    failed = [v for v in folder.library.voices() if v["file"] == f"{nfc}.flac"][0]
    assert f"already taken by {nfd}.wav" in failed["error"]

def test_rename_is_ready_again_without_preparing(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    copy(clips["carlo_a"], folder.voices / "carlo.wav")
    first = folder.wait_state("carlo", "ready")
    folder.wait_idle()
    calls = folder.encoder.calls
    folder.events.clear()

    os.rename(folder.voices / "carlo.wav", folder.voices / "carlo-renamed.wav")
    renamed = folder.wait_state("carlo-renamed", "ready")
    folder.wait_gone("carlo")
    assert renamed["sha256"] == first["sha256"]
    assert folder.encoder.calls == calls, "a rename must reuse the cached embedding"
    assert ("preparing", "carlo-renamed") not in [(e, v["name"]) for e, v in folder.events]
    assert folder.cache is not None and folder.cache.entries_for(first["sha256"])

    # a move into a subfolder, and a whole folder moved: same content, nothing recomputed
    (folder.voices / "it").mkdir()
    os.rename(folder.voices / "carlo-renamed.wav", folder.voices / "it" / "carlo.wav")
    folder.wait_state("it/carlo", "ready", sha256=first["sha256"])
    os.rename(folder.voices / "it", folder.voices / "italian")
    folder.wait_state("italian/carlo", "ready", sha256=first["sha256"])
    folder.wait_gone("it/carlo")
    assert folder.encoder.calls == calls


def test_changed_content_is_prepared_again(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    target = folder.voices / "speaker.wav"
    copy(clips["allison_a"], target)
    first = folder.wait_state("speaker", "ready")
    folder.library.wait_for(lambda: True, 0)  # type: ignore[union-attr]
    emb_a = folder.library.embedding("speaker")  # type: ignore[union-attr]
    shutil.copyfile(clips["june_a"], target)  # rewritten in place (open, truncate, write, close)
    second = folder.wait_state("speaker", "ready", sha256=sha256_file(clips["june_a"]))
    assert second["sha256"] != first["sha256"]
    emb_b = folder.library.embedding("speaker")  # type: ignore[union-attr]
    assert emb_a is not None and emb_b is not None
    assert float(emb_a @ emb_b) < 0.9, "the embedding must follow the new content"


def test_moves_into_and_out_of_the_folder(folder: Folder, clips: dict[str, Path], tmp_path: Path) -> None:
    folder.start()
    outside = tmp_path / "outside"
    outside.mkdir()
    staged = copy(clips["june_b"], outside / "june.wav")
    os.rename(staged, folder.voices / "june.wav")  # renamed in: complete at once
    folder.wait_state("june", "ready")
    os.rename(folder.voices / "june.wav", outside / "june.wav")
    folder.wait_gone("june")

    # a whole folder moved in, then out
    batch = outside / "batch"
    copy(clips["allison_a"], batch / "a.wav")
    copy(clips["carlo_a"], batch / "b.wav")
    os.rename(batch, folder.voices / "batch")
    folder.wait_state("batch/a", "ready")
    folder.wait_state("batch/b", "ready")
    os.rename(folder.voices / "batch", outside / "batch")
    folder.wait_gone("batch/a")
    folder.wait_gone("batch/b")


def test_editor_save_by_rename_and_rsync_temp_files(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    target = folder.voices / "voice.wav"
    copy(clips["allison_a"], target)
    folder.wait_state("voice", "ready")

    # an editor writes a hidden swap file, then renames it over the original
    swap = folder.voices / ".voice.wav.swp"
    copy(clips["allison_b"], swap.with_suffix(".tmp")).rename(swap)
    os.replace(swap, target)
    folder.wait_state("voice", "ready", sha256=sha256_file(clips["allison_b"]))

    # rsync writes ".name.XXXXXX" and renames it into place when complete
    temp = folder.voices / ".carlo.wav.Ab12Cd"
    copy(clips["carlo_a"], temp)
    os.rename(temp, folder.voices / "carlo.wav")
    folder.wait_state("carlo", "ready", sha256=sha256_file(clips["carlo_a"]))
    names = {v["name"] for v in folder.library.voices()}  # type: ignore[union-attr]
    assert names == {"voice", "carlo"}


def test_ignored_files(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    copy(clips["allison_a"], folder.voices / ".hidden.wav")
    copy(clips["allison_a"], folder.voices / "download.wav.part")
    copy(clips["allison_a"], folder.voices / "backup.wav~")
    copy(clips["allison_a"], folder.voices / ".git" / "x.wav")
    (folder.voices / "notes.txt").write_text("not audio")
    copy(clips["june_a"], folder.voices / "real.wav")
    folder.wait_state("real", "ready")
    folder.wait_idle()
    assert [v["name"] for v in folder.library.voices()] == ["real"]  # type: ignore[union-attr]


def test_large_file_written_slowly_is_prepared_once_complete(folder: Folder, clips: dict[str, Path]) -> None:
    """A writer that pauses (shorter than settle_s) between chunks: no half-written preparation."""
    folder.start()
    data = clips["carlo_a"].read_bytes()
    target = folder.voices / "slow.wav"
    with open(target, "wb") as fh:
        for start in range(0, len(data), 32768):
            fh.write(data[start : start + 32768])
            fh.flush()
            time.sleep(0.05)
    voice = folder.wait_state("slow", "ready")
    folder.wait_event("ready", "slow")
    assert voice["sha256"] == sha256_file(clips["carlo_a"])
    assert [e for e, _ in folder.events] == ["preparing", "ready"], folder.events


def test_writer_that_never_closes_is_prepared_once_size_settles(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    target = folder.voices / "open.wav"
    fh = open(target, "wb")
    try:
        fh.write(clips["june_b"].read_bytes())
        fh.flush()
        voice = folder.wait_state("open", "ready")  # still open: settled by size
        assert voice["sha256"] == sha256_file(clips["june_b"])
    finally:
        fh.close()


def test_polling_observer(tmp_path: Path, speaker_encoder: Any, clips: dict[str, Path]) -> None:
    folder = Folder(tmp_path, speaker_encoder, observer="polling", poll_interval_s=0.2)
    folder.start()
    try:
        assert folder.watcher is not None and folder.watcher.observer_kind == "PollingObserver"
        copy(clips["allison_b"], folder.voices / "polled.flac")
        folder.wait_state("polled", "ready")
        (folder.voices / "polled.flac").unlink()
        folder.wait_gone("polled")
    finally:
        folder.stop()


# ---------------------------------------------------------------------------- bad inputs


def _silence(path: Path, seconds: float) -> Path:
    sf.write(path, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
    return path


def test_bad_inputs_fail_with_a_reason_and_the_rest_goes_on(
    folder: Folder, clips: dict[str, Path], tmp_path: Path
) -> None:
    folder.start()
    v = folder.voices
    (v / "empty.wav").write_bytes(b"")
    (v / "garbage.wav").write_bytes(os.urandom(5000))
    (v / "text.flac").write_text("this is not a flac file at all\n" * 50)
    data = clips["allison_a"].read_bytes()
    (v / "truncated.wav").write_bytes(data[:30])
    _silence(v / "silence.wav", 5.0)
    short, sr = sf.read(clips["june_a"], dtype="float32")
    sf.write(v / "short.wav", short[: int(0.5 * sr)], sr)
    secret = tmp_path / "secret.wav"
    copy(clips["carlo_a"], secret)
    os.symlink(secret, v / "escape.wav")
    os.symlink(v / "nowhere.wav", v / "dangling.wav")
    copy(clips["allison_b"], v / "good.flac")
    rng = np.random.default_rng(3)
    white = rng.standard_normal(16000 * 4) * 0.1
    sf.write(v / "hiss.wav", white.astype(np.float32), 16000)
    rumble = np.cumsum(white)
    sf.write(v / "rumble.wav", (0.5 * (rumble - rumble.mean()) / np.abs(rumble).max()).astype(np.float32), 16000)
    t = np.arange(16000 * 4) / 16000
    sf.write(v / "hum.wav", (0.2 * np.sin(2 * np.pi * 50 * t) + 0.01 * white).astype(np.float32), 16000)
    speech, sr = sf.read(clips["june_b"], dtype="float32")
    noisy = speech + rng.standard_normal(len(speech)).astype(np.float32) * speech.std()  # 0 dB SNR
    sf.write(v / "noisy-speech.wav", noisy / np.abs(noisy).max(), sr)

    expected = {
        "empty": "empty",
        "garbage": "",
        "text": "",
        "truncated": "",
        "silence": "speech",
        "short": "too short",
        "escape": "outside the voices folder",
        "dangling": "broken symlink",
        "hiss": "no voiced speech",
        "rumble": "no voiced speech",
        "hum": "no voiced speech",
    }
    for name, fragment in expected.items():
        voice = folder.wait_state(name, "failed")
        assert voice["error"], name
        assert fragment in voice["error"].lower(), (name, voice["error"])
    folder.wait_state("good", "ready")
    folder.wait_state("noisy-speech", "ready")
    for name in expected:
        assert folder.wait_event("failed", name)["error"] == folder.voice(name)["error"]  # type: ignore[index]


def test_long_recording_uses_the_first_seconds_and_says_so(tmp_path: Path, speaker_encoder: Any, clips: dict[str, Path]) -> None:
    folder = Folder(tmp_path, speaker_encoder, max_duration_s=5.0)
    folder.start()
    try:
        copy(clips["allison_a"], folder.voices / "long.wav")
        voice = folder.wait_state("long", "ready")
        assert "first 5.0s of 12.0s" in voice["note"]
        assert abs(voice["duration_s"] - 12.0) < 0.1
    finally:
        folder.stop()


def test_failed_file_fixed_later_becomes_ready(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    target = folder.voices / "fixme.wav"
    target.write_bytes(b"RIFF0000WAVE")
    folder.wait_state("fixme", "failed")
    shutil.copyfile(clips["june_a"], target)
    folder.wait_state("fixme", "ready")


def test_same_name_two_extensions(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    copy(clips["allison_a"], folder.voices / "dup.wav")
    folder.wait_state("dup", "ready")
    copy(clips["allison_b"], folder.voices / "dup.flac")
    assert folder.library is not None
    assert folder.library.wait_for(
        lambda: any(v["file"] == "dup.flac" and v["state"] == "failed" for v in folder.library.voices()), TIMEOUT
    )
    failed = [v for v in folder.library.voices() if v["file"] == "dup.flac"][0]
    assert "already taken by dup.wav" in failed["error"]
    (folder.voices / "dup.wav").unlink()
    folder.wait_state("dup", "ready", file="dup.flac")


# ---------------------------------------------------------------------------- races


def test_file_replaced_while_being_prepared_discards_the_stale_result(
    folder: Folder, clips: dict[str, Path]
) -> None:
    folder.encoder.gate = threading.Event()
    folder.start()
    target = folder.voices / "racy.wav"
    copy(clips["allison_a"], target)
    assert folder.encoder.entered.wait(TIMEOUT), "preparation never started"
    assert folder.voice("racy")["state"] == "preparing"  # type: ignore[index]
    shutil.copyfile(clips["carlo_a"], target)  # replaced mid-preparation
    assert folder.library is not None
    folder.library.wait_for(lambda: folder.library.queue_depth() >= 2, 5.0)  # type: ignore[union-attr]
    folder.encoder.gate.set()
    new_sha = sha256_file(clips["carlo_a"])
    folder.wait_state("racy", "ready", sha256=new_sha)
    folder.wait_event("ready", "racy")
    folder.wait_idle()
    ready_shas = [v["sha256"] for e, v in folder.events if e == "ready"]
    assert ready_shas == [new_sha], "the result computed from the old content must never be published"


def test_file_deleted_mid_preparation_is_removed(folder: Folder, clips: dict[str, Path]) -> None:
    folder.encoder.gate = threading.Event()
    folder.start()
    target = copy(clips["june_b"], folder.voices / "gone.wav")
    assert folder.encoder.entered.wait(TIMEOUT)
    target.unlink()
    folder.wait_gone("gone")
    folder.encoder.gate.set()
    folder.wait_idle()
    assert folder.voice("gone") is None
    assert "ready" not in [e for e, _ in folder.events]


# ---------------------------------------------------------------------------- restarts


def test_restart_reconciles_without_rehashing_unchanged_files(
    tmp_path: Path, speaker_encoder: Any, clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Folder(tmp_path, speaker_encoder, rename_grace_s=3600.0)
    folder.start()
    for name in ("allison_a", "carlo_a", "june_a", "june_b"):
        copy(clips[name], folder.voices / f"{name}.wav")
    for name in ("allison_a", "carlo_a", "june_a", "june_b"):
        folder.wait_state(name, "ready")
    folder.stop()

    # while nothing runs: one added, one changed, one deleted, one renamed; the rest untouched
    copy(clips["allison_b"], folder.voices / "added.flac")
    shutil.copyfile(clips["allison_a"], folder.voices / "june_a.wav")
    (folder.voices / "carlo_a.wav").unlink()
    os.rename(folder.voices / "june_b.wav", folder.voices / "june_renamed.wav")

    hashed: list[str] = []
    import voiced.library.folder as folder_module
    import voiced.library.preparer as preparer_module

    real_sha = folder_module.sha256_file

    def counting_sha(path: Any, *args: Any, **kwargs: Any) -> str:
        hashed.append(Path(path).name)
        return real_sha(path, *args, **kwargs)

    monkeypatch.setattr(folder_module, "sha256_file", counting_sha)  # a rescan hashes in bulk
    monkeypatch.setattr(preparer_module, "sha256_file", counting_sha)  # the worker, what the rescan left
    folder.encoder.calls = 0
    folder.start()
    folder.wait_state("added", "ready")
    folder.wait_state("june_a", "ready", sha256=sha256_file(clips["allison_a"]))
    folder.wait_state("june_renamed", "ready", sha256=sha256_file(clips["june_b"]))
    folder.wait_state("allison_a", "ready")
    folder.wait_idle()
    assert folder.voice("carlo_a") is None
    assert "allison_a.wav" not in hashed, "an unchanged file must not be re-hashed"
    assert sorted(hashed) == ["added.flac", "june_a.wav", "june_renamed.wav"]
    # june_a now holds allison_a's content and june_renamed june_b's: both are cache hits
    assert folder.encoder.calls == 1, "only the new content (added.flac) needs the encoder"


def test_overflow_triggers_a_full_rescan(folder: Folder, clips: dict[str, Path]) -> None:
    folder.start()
    assert folder.watcher is not None and folder.library is not None
    before = folder.watcher.rescans
    # watchdog reports a kernel queue overflow only through its logger
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
    assert folder.library.wait_for(lambda: folder.watcher.rescans > before, TIMEOUT)  # type: ignore[union-attr]
