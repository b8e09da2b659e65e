"""The shared store (a folder machines mount) and the local store as its read-through cache:
real files, real processes, real daemons sharing one folder."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fakes import FAKE_ENGINES
from voiced.config import parse_config
from voiced.errors import CacheError, ConfigError
from voiced.fsutil import sha256_file
from voiced.store import ArtifactStore, FolderStore, LocalStore, TieredStore, open_store
from voiced.testing import DaemonProcess

PRODUCER, KIND = "ge2e-resemblyzer@1-abcdef", "kokoro/quick"


def source(i: int) -> str:
    return hashlib.sha256(f"source-{i}".encode()).hexdigest()


def arrays(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"style": rng.standard_normal((4, 8)).astype(np.float32), "n": np.arange(i + 1)}


def same(got: dict[str, np.ndarray] | None, want: dict[str, np.ndarray]) -> bool:
    return got is not None and sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)


def art_files(root: Path) -> list[Path]:
    return sorted((root / "entries").glob("*/*/*.art"))


# ---------------------------------------------------------------------------- the shared folder


def test_folder_store_round_trip(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "share")
    assert isinstance(store, ArtifactStore)
    assert store.get(source(1), PRODUCER, KIND) is None and not store.has(source(1), PRODUCER, KIND)
    store.put(source(1), PRODUCER, KIND, arrays(1), {"stage": "quick", "rate": 24000})
    store.put(source(1), "kokoro@0.9/odd name", KIND, arrays(2))
    assert store.has(source(1), PRODUCER, KIND)
    got, meta = store.get_entry(source(1), PRODUCER, KIND)  # type: ignore[misc]
    assert same(got, arrays(1)) and meta == {"stage": "quick", "rate": 24000}
    assert store.get_meta(source(1), PRODUCER, KIND) == {"stage": "quick", "rate": 24000}
    assert same(store.get(source(1), "kokoro@0.9/odd name", KIND), arrays(2))
    store.put(source(1), PRODUCER, KIND, arrays(3))  # replaced whole
    assert same(store.get(source(1), PRODUCER, KIND), arrays(3)) and store.get_meta(source(1), PRODUCER, KIND) == {}
    # another process's view of the same folder (another machine's mount)
    other = FolderStore(tmp_path / "share")
    assert same(other.get(source(1), PRODUCER, KIND), arrays(3))
    stats = other.stats()
    assert (stats.entries, stats.hits, stats.misses) == (2, 1, 0) and stats.bytes > 0
    assert store.evict(source(1)) == 2 and other.get(source(1), PRODUCER, KIND) is None
    with pytest.raises(ValueError):
        store.put("../../etc", PRODUCER, KIND, arrays(1))  # a key never names a path


def test_damaged_artefact_is_a_miss_and_goes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FolderStore(tmp_path / "share")
    store.put(source(1), PRODUCER, KIND, arrays(1))
    (path,) = art_files(tmp_path / "share")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert store.get(source(1), PRODUCER, KIND) is None
    assert "checksum mismatch" in caplog.text and not path.exists()
    store.put(source(1), PRODUCER, KIND, arrays(1))
    assert same(store.get(source(1), PRODUCER, KIND), arrays(1))


def test_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "FORMAT").write_text("voiced-shared-store 9\n")
    with pytest.raises(CacheError, match="not a store this version can use"):
        FolderStore(tmp_path / "share")


def test_content_goes_when_no_holder_anywhere_holds_it(tmp_path: Path) -> None:
    a, b = FolderStore(tmp_path / "share"), FolderStore(tmp_path / "share")  # two machines
    for i in (1, 2, 3):
        a.put(source(i), PRODUCER, KIND, arrays(i))
    a.retain("host-a:/voices", {source(1), source(2)})
    b.hold("host-b:/voices", {source(2)})
    assert a.holders(source(2)) == ["host-a:/voices", "host-b:/voices"]
    assert a.collect_garbage(grace_s=3600) == 0  # source 3 is marked unheld: its grace starts
    assert a.has(source(3), PRODUCER, KIND)
    assert b.collect_garbage(grace_s=0) == 1 and not a.has(source(3), PRODUCER, KIND)
    a.release("host-a:/voices", {source(2)})
    assert b.collect_garbage(grace_s=0) == 0 and b.has(source(2), PRODUCER, KIND)  # b holds it still
    b.release("host-b:/voices", {source(2)})
    assert a.collect_garbage(grace_s=0) == 1 and not a.has(source(2), PRODUCER, KIND)
    # a restarted daemon finds its holds in its file, and held content came back is kept
    again = FolderStore(tmp_path / "share")
    again.release("host-a:/voices", set())
    assert again.holders(source(1)) == ["host-a:/voices"]
    assert again.collect_garbage(grace_s=0) == 0 and again.has(source(1), PRODUCER, KIND)


def test_an_unreadable_holder_file_stops_collection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FolderStore(tmp_path / "share")
    store.put(source(1), PRODUCER, KIND, arrays(1))
    (tmp_path / "share" / "holders" / "0123.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert store.collect_garbage(grace_s=0) == 0
    assert "collecting nothing" in caplog.text and store.has(source(1), PRODUCER, KIND)


def test_machines_writing_one_share_at_once(tmp_path: Path) -> None:
    """Four processes put and read the same keys at once: every read is whole and right."""
    script = textwrap.dedent(f"""
        import hashlib, sys
        import numpy as np
        from voiced.store import FolderStore
        store = FolderStore(sys.argv[1])
        for round in range(15):
            for i in range(6):
                src = hashlib.sha256(f"source-{{i}}".encode()).hexdigest()
                rng = np.random.default_rng(i)
                want = {{"style": rng.standard_normal((4, 8)).astype(np.float32), "n": np.arange(i + 1)}}
                store.put(src, {PRODUCER!r}, {KIND!r}, want)
                got = store.get(src, {PRODUCER!r}, {KIND!r})
                assert got is not None and all(np.array_equal(got[k], want[k]) for k in want), (round, i)
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "share")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err
    assert len(art_files(tmp_path / "share")) == 6
    assert not list((tmp_path / "share" / "entries").glob("*/*/tmp-*"))


# ---------------------------------------------------------------------------- local in front of shared


def machine(tmp_path: Path, name: str) -> TieredStore:
    store = open_store(tmp_path / name / "cache", None, tmp_path / "share")
    assert isinstance(store, TieredStore)
    return store


def test_read_through(tmp_path: Path) -> None:
    a, b = machine(tmp_path, "a"), machine(tmp_path, "b")
    assert isinstance(a, ArtifactStore)
    a.put(source(1), PRODUCER, KIND, arrays(1), {"stage": "quick"})
    assert b.local.get(source(1), PRODUCER, KIND) is None and b.has(source(1), PRODUCER, KIND)
    assert b.get_meta(source(1), PRODUCER, KIND) == {"stage": "quick"}
    got, meta = b.get_entry(source(1), PRODUCER, KIND)  # type: ignore[misc]
    assert same(got, arrays(1)) and meta == {"stage": "quick"} and b.shared_hits() == 1
    assert same(b.local.get(source(1), PRODUCER, KIND), arrays(1))  # copied: the share is read once
    shutil.rmtree(tmp_path / "share" / "entries")
    assert same(b.get(source(1), PRODUCER, KIND), arrays(1)) and b.shared_hits() == 1
    assert b.get(source(2), PRODUCER, KIND) is None
    stats = b.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 2, 1)


def test_a_local_artefact_is_shared_when_next_read(tmp_path: Path) -> None:
    LocalStore(tmp_path / "a" / "cache").put(source(1), PRODUCER, KIND, arrays(1))  # made before sharing
    a, b = machine(tmp_path, "a"), machine(tmp_path, "b")
    assert not b.has(source(1), PRODUCER, KIND)
    assert same(a.get(source(1), PRODUCER, KIND), arrays(1))
    assert same(b.get(source(1), PRODUCER, KIND), arrays(1))


def test_a_share_gone_away_leaves_the_local_store_working(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = machine(tmp_path, "a")
    a.put(source(1), PRODUCER, KIND, arrays(1))
    (tmp_path / "share").rename(tmp_path / "unmounted")
    (tmp_path / "share").mkdir()  # the mount went away: its mount point is left, empty
    with caplog.at_level(logging.WARNING):
        a.put(source(2), PRODUCER, KIND, arrays(2))
        a.hold("host-a:/voices", {source(1), source(2)})
    assert "is not there (is the share mounted?) (kept in the local cache only)" in caplog.text
    assert not list((tmp_path / "share").iterdir())  # nothing written under the mount point
    assert same(a.get(source(1), PRODUCER, KIND), arrays(1)) and same(a.get(source(2), PRODUCER, KIND), arrays(2))
    assert a.get(source(3), PRODUCER, KIND) is None
    assert a.collect_garbage(0.0) == 0 and same(a.get(source(2), PRODUCER, KIND), arrays(2))


def test_holds_and_collection_reach_both(tmp_path: Path) -> None:
    a, b = machine(tmp_path, "a"), machine(tmp_path, "b")
    a.put(source(1), PRODUCER, KIND, arrays(1))
    a.retain("host-a:/voices", {source(1)})
    b.get(source(1), PRODUCER, KIND)
    b.retain("host-b:/voices", {source(1)})
    a.release("host-a:/voices", {source(1)})  # deleted on machine a only
    a.collect_garbage(0.0)
    assert a.local.get(source(1), PRODUCER, KIND) is None and b.has(source(1), PRODUCER, KIND)
    b.release("host-b:/voices", {source(1)})  # and on b
    b.collect_garbage(0.0)
    assert not b.has(source(1), PRODUCER, KIND) and not art_files(tmp_path / "share")


def test_shared_dir_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    config = parse_config({"cache": {"dir": str(tmp_path / "cache"), "shared_dir": "share"}},
                          source=tmp_path / "voiced.toml", check_dirs=True)
    assert config.cache.shared_dir == str(tmp_path / "share")  # relative to the config file
    with pytest.raises(ConfigError, match=r"\[cache\] shared_dir: folder does not exist \(is the share mounted\?\)"):
        parse_config({"cache": {"dir": str(tmp_path / "cache"), "shared_dir": str(tmp_path / "nfs")}},
                     source=tmp_path / "voiced.toml", check_dirs=True)


# ---------------------------------------------------------------------------- two daemons, one share


def test_a_voice_prepared_on_one_machine_is_not_prepared_on_another(tmp_path: Path, testdata_dir: Path) -> None:
    settings = {"engine": {"name": "tone"}, "plugins": {"paths": [FAKE_ENGINES]},
                "cache": {"shared_dir": tmp_path / "share"}}
    (tmp_path / "share").mkdir()
    clip = testdata_dir / "voices" / "june_a.wav"
    sha = sha256_file(clip)
    with DaemonProcess(tmp_path / "a", settings).start() as a:
        shutil.copyfile(clip, a.voices / "june.wav")
        a.wait_ready("june")
        with DaemonProcess(tmp_path / "b", settings).start() as b:
            shutil.copyfile(clip, b.voices / "speaker.wav")  # another name, the same recording
            b.wait_ready("speaker")
            assert "voice ready: speaker (from cache)" in b.log_tail(20_000)
            with b.client() as client:
                reply_b = client.synthesize("Hello there.", voice="speaker", format="pcm_s16le").audio
                assert client.status()["cache"]["shared"]["hits"] >= 1  # read from the share, not made
            with a.client() as client:
                assert client.synthesize("Hello there.", voice="june", format="pcm_s16le").audio == reply_b
            folder = tmp_path / "share" / "entries" / sha[:2] / sha
            (a.voices / "june.wav").unlink()  # deleted on a: b holds it still
            a.wait_voice("june", lambda v: v is None)
            with b.client() as client:
                client.synthesize("Still here.", voice="speaker", format="pcm_s16le")
            assert list(folder.glob("*.art"))
            (b.voices / "speaker.wav").unlink()  # deleted everywhere: collected from the share
            b.wait_voice("speaker", lambda v: v is None)
            deadline = time.monotonic() + 30
            while folder.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not folder.exists(), b.log_tail()
