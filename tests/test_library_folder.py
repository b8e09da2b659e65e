"""Tests of voiced.library.folder: which files can be voices, and what a rescan finds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from voiced.config import VoicesConfig
from voiced.errors import AudioError
from voiced.fsutil import sha256_file
from voiced.library.files import FileRecord
from voiced.library.folder import Folder, Scan


@pytest.fixture
def folder(tmp_path: Path) -> Folder:
    root = tmp_path / "voices"
    (root / "en").mkdir(parents=True)
    (root / "en" / "alice.wav").write_bytes(b"alice")
    (root / "bob.flac").write_bytes(b"bob")
    (root / "notes.txt").write_bytes(b"not audio")
    (root / ".hidden.wav").write_bytes(b"hidden")
    (root / "carol.wav.part").write_bytes(b"still downloading")
    (root / "empty.wav").write_bytes(b"")
    return Folder(VoicesConfig(dir=str(root)))


def test_walk_finds_the_recordings_only(folder: Folder) -> None:
    assert sorted(folder.walk()) == ["bob.flac", "empty.wav", "en/alice.wav"]
    assert sorted(folder.walk("en")) == ["en/alice.wav"]
    assert folder.walk("missing") == {}


def test_scan_hashes_only_what_its_records_do_not_vouch_for(folder: Folder) -> None:
    found = folder.walk()
    st = found["bob.flac"]
    records = {"bob.flac": FileRecord("bob.flac", st.st_size, st.st_mtime_ns, st.st_ino, "b" * 64)}
    scan = Scan()
    out = {path: sha for path, _, sha in folder.scan(found, records, lambda p, s: p == "empty.wav", 0.0, scan)}
    assert out == {"bob.flac": "b" * 64, "en/alice.wav": sha256_file(folder.root / "en/alice.wav")}
    assert scan.unchanged == 2  # bob by its record, empty.wav known
    assert [r.path for r in scan.hashed] == ["en/alice.wav"]


def test_scan_leaves_files_still_being_written_to_the_settle_tracker(folder: Folder) -> None:
    old = time.time() - 60
    os.utime(folder.root / "bob.flac", (old, old))
    scan = Scan()
    out = [path for path, _, _ in folder.scan(folder.walk(), {}, lambda p, s: False, 5.0, scan)]
    assert out == ["bob.flac"] and sorted(scan.recent) == ["empty.wav", "en/alice.wav"]


def test_check_says_why_a_file_cannot_be_a_reference(folder: Folder, tmp_path: Path) -> None:
    folder.check("en/alice.wav")
    with pytest.raises(AudioError, match="empty file"):
        folder.check("empty.wav")
    (tmp_path / "outside.wav").write_bytes(b"x")
    os.symlink(tmp_path / "outside.wav", folder.root / "link.wav")
    with pytest.raises(AudioError, match="outside the voices folder"):
        folder.check("link.wav")
    os.symlink(folder.root / "nowhere.wav", folder.root / "dangling.wav")
    assert folder.stat("dangling.wav").st_size >= 0  # the link's own: the worker reports it
    with pytest.raises(FileNotFoundError):
        folder.stat("never.wav")


def test_a_name_that_is_not_utf8_is_refused(folder: Folder, caplog: pytest.LogCaptureFixture) -> None:
    name = b"caf\xe9.wav".decode("utf-8", "surrogateescape")
    assert not folder.accepts(name) and not folder.accepts(name)
    assert sum("not valid UTF-8" in r.getMessage() for r in caplog.records) == 1  # said once
