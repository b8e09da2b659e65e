"""Tests of voiced.store (the local artefact store): real files, real sqlite, real subprocesses (no mocks)."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import voiced.store.local as cache_mod
from voiced.store import ArtifactStore, LocalStore, StoreStats
from voiced.errors import CacheError
from voiced.fsutil import sha256_file

REPO = Path(__file__).resolve().parents[1]
PRODUCERS = ("ge2e-resemblyzer@1-abcdef", "kokoro@0.9-123456")
KINDS = ("embedding", "kokoro/quick", "kokoro/refined")


def source(i: int) -> str:
    """A deterministic stand-in for a recording's sha256."""
    return hashlib.sha256(f"source-{i}".encode()).hexdigest()


def expected_arrays(src: str, producer: str, kind: str) -> dict[str, np.ndarray]:
    """Arrays derived from the key alone, so any process can check what another wrote."""
    seed = int(hashlib.sha256(f"{src}|{producer}|{kind}".encode()).hexdigest()[:16], 16)
    rng = np.random.default_rng(seed)
    return {
        "embedding": rng.standard_normal(256).astype(np.float32),
        "tokens": rng.integers(0, 1 << 40, size=int(rng.integers(1, 300)), dtype=np.int64),
    }


def assert_arrays_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name])


def object_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "objects").glob("*/*.npz"))


def temp_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "objects").glob("*/tmp-*.part"))


def indexed_objects(cache_dir: Path) -> set[str]:
    with sqlite3.connect(cache_dir / "index.sqlite") as conn:
        return {r[0] for r in conn.execute("SELECT object FROM entries")}


def check_totals(cache_dir: Path) -> None:
    """The trigger-maintained totals agree with the rows."""
    conn = sqlite3.connect(cache_dir / "index.sqlite")
    try:
        count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM entries").fetchone()
        assert conn.execute("SELECT entries, bytes FROM totals").fetchone() == (count, size)
    finally:
        conn.close()


def child_script(tmp_path: Path, body: str) -> Path:
    """Write a child program that can import voiced and the helpers above."""
    helpers = "\n\n".join(
        textwrap.dedent(inspect.getsource(f)) for f in (source, expected_arrays, assert_arrays_equal)
    )
    script = tmp_path / "child.py"
    script.write_text(
        "from __future__ import annotations\n"
        "import hashlib, logging, random, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import numpy as np\n"
        "from voiced.store import LocalStore\n"
        "from voiced.errors import CacheError\n"
        f"PRODUCERS = {PRODUCERS!r}\nKINDS = {KINDS!r}\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stderr)\n"
        + helpers
        + "\n\n"
        + textwrap.dedent(body)
    )
    return script


@pytest.fixture
def cache(tmp_path: Path):
    with LocalStore(tmp_path / "cache") as c:
        yield c


# ---------------------------------------------------------------------------- basics


def test_roundtrip_and_misses(cache: LocalStore) -> None:
    src, prod, kind = source(1), PRODUCERS[0], KINDS[0]
    want = expected_arrays(src, prod, kind)
    assert cache.get(src, prod, kind) is None
    assert not cache.has(src, prod, kind)
    cache.put(src, prod, kind, want, {"sample_rate": 16000, "trim": [0.1, 2.5], "name": "ünï"})
    assert cache.has(src, prod, kind)
    assert_arrays_equal(cache.get(src, prod, kind), want)
    assert cache.get_meta(src, prod, kind) == {"sample_rate": 16000, "trim": [0.1, 2.5], "name": "ünï"}
    # Misses on any other component of the key.
    assert cache.get(src, PRODUCERS[1], kind) is None
    assert cache.get(src, prod, KINDS[1]) is None
    assert cache.get(source(2), prod, kind) is None
    assert cache.get_meta(src, prod, KINDS[1]) is None
    # Without meta: {} (an entry exists), not None.
    cache.put(src, prod, KINDS[1], {"x": np.zeros(3, np.float32)})
    assert cache.get_meta(src, prod, KINDS[1]) == {}
    assert cache.entries_for(src) == [(prod, KINDS[0]), (prod, KINDS[1])]
    stats = cache.stats()
    assert isinstance(stats, StoreStats)
    # every lookup counts, get_meta and has too: 4 found, 6 not
    assert (stats.entries, stats.hits, stats.misses, stats.size_limit_bytes) == (2, 4, 6, None)
    assert stats.bytes == sum(p.stat().st_size for p in object_files(cache.directory))


def test_get_entry_is_one_lookup(cache: LocalStore) -> None:
    """Arrays and metadata come from one index read, and count as one hit (or one miss)."""
    src, prod, kind = source(1), PRODUCERS[0], KINDS[0]
    want = expected_arrays(src, prod, kind)
    assert cache.get_entry(src, prod, kind) is None
    cache.put(src, prod, kind, want, {"duration_s": 2.5})
    cache.put(src, prod, KINDS[1], want)
    arrays, meta = cache.get_entry(src, prod, kind)
    assert_arrays_equal(arrays, want)
    assert meta == {"duration_s": 2.5}
    assert cache.get_entry(src, prod, KINDS[1])[1] == {}
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 1)


def test_replace_entry_removes_old_object(cache: LocalStore) -> None:
    src = source(1)
    cache.put(src, "p@1", "k", {"a": np.arange(10)})
    cache.put(src, "p@1", "k", {"a": np.arange(20)})
    np.testing.assert_array_equal(cache.get(src, "p@1", "k")["a"], np.arange(20))
    assert len(object_files(cache.directory)) == 1
    assert cache.stats().entries == 1
    check_totals(cache.directory)


def test_put_rejects_pickle_and_bad_names(cache: LocalStore) -> None:
    with pytest.raises(TypeError):
        cache.put(source(1), "p@1", "k", {"a": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ValueError):
        cache.put(source(1), "p@1", "k", {"file": np.zeros(1)})
    with pytest.raises(ValueError):
        cache.put(source(1), "p@1", "k", {})
    with pytest.raises(TypeError):
        cache.put(source(1), "p@1", "k", {"a": np.zeros(1)}, {"not json": object()})
    assert not cache.has(source(1), "p@1", "k")
    assert object_files(cache.directory) == [] and temp_files(cache.directory) == []


def test_directories_are_private(cache: LocalStore) -> None:
    cache.put(source(1), "p@1", "k", {"a": np.zeros(1)})
    for d in [cache.directory, cache.directory / "objects", *(cache.directory / "objects").iterdir()]:
        assert d.stat().st_mode & 0o777 == 0o700, d
    with sqlite3.connect(cache.directory / "index.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == cache_mod.SCHEMA_VERSION


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_size=1024) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()


def test_threads_share_one_cache(cache: LocalStore) -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(40):
                key = (source(rnd.randrange(8)), rnd.choice(PRODUCERS), rnd.choice(KINDS))
                if rnd.random() < 0.5:
                    cache.put(*key, expected_arrays(*key))
                else:
                    got = cache.get(*key)
                    if got is not None:
                        assert_arrays_equal(got, expected_arrays(*key))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    check_totals(cache.directory)
    assert cache.collect_garbage(grace_s=1e9) == 0  # no orphans left by racing puts


# ---------------------------------------------------------------------------- corruption


def test_flipped_bytes_are_detected(cache: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    key = (source(1), PRODUCERS[0], KINDS[0])
    cache.put(*key, expected_arrays(*key))
    (obj,) = object_files(cache.directory)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="voiced.store"):
        assert cache.get(*key) is None
    assert "checksum mismatch" in caplog.text and str(obj) in caplog.text
    assert not cache.has(*key)
    assert not obj.exists()
    cache.put(*key, expected_arrays(*key))
    assert_arrays_equal(cache.get(*key), expected_arrays(*key))
    check_totals(cache.directory)


def test_missing_object_is_a_miss(cache: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    key = (source(1), PRODUCERS[0], KINDS[0])
    cache.put(*key, expected_arrays(*key))
    object_files(cache.directory)[0].unlink()
    with caplog.at_level(logging.WARNING, logger="voiced.store"):
        assert cache.get(*key) is None
    assert "missing" in caplog.text
    assert not cache.has(*key)
    assert cache.stats().entries == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_index_is_replaced(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "cache"
    with LocalStore(d) as c:
        for i in range(50):  # enough rows for a multi-page database
            c.hold("host:/voices", [source(i)])
            c.put(source(i), "p@1", "k", {"a": np.full(10, i)}, {"i": i})
    index = d / "index.sqlite"
    assert not (d / "index.sqlite-wal").exists()  # checkpointed on close
    if damage == "garbage":
        index.write_bytes(random.Random(0).randbytes(index.stat().st_size))
    else:
        with open(index, "r+b") as f:
            f.truncate(index.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="voiced.store"), LocalStore(d) as c:
        assert "corrupt" in caplog.text
        assert c.get(source(1), "p@1", "k") is None
        assert c.holders(source(1)) == []
        c.put(source(1), "p@1", "k", {"a": np.arange(3)})
        np.testing.assert_array_equal(c.get(source(1), "p@1", "k")["a"], np.arange(3))
        assert c.collect_garbage(grace_s=1e9) == 50  # the old objects are orphans now
        assert len(object_files(d)) == 1
    assert len(list(d.glob("index.sqlite.corrupt-*"))) == 1


def test_schema_version_mismatch_rebuilds(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    with LocalStore(d) as c:
        c.put(source(1), "p@1", "k", {"a": np.arange(3)})
    with sqlite3.connect(d / "index.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with LocalStore(d) as c:
        assert c.stats().entries == 0
        assert c.collect_garbage() == 1
        c.put(source(1), "p@1", "k", {"a": np.arange(3)})
        assert c.has(source(1), "p@1", "k")


# ---------------------------------------------------------------------------- crash safety

CRASH_CHILD = """
def main() -> None:
    directory, seed = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(seed)
    cache = LocalStore(directory, size_limit_bytes=60_000)
    print("ready", flush=True)
    while True:
        src = source(rnd.randrange(12))
        key = (src, rnd.choice(PRODUCERS), rnd.choice(KINDS))
        op = rnd.random()
        if op < 0.7:
            cache.put(*key, expected_arrays(*key), {"key": list(key)})
        elif op < 0.75:
            cache.evict(src)
        elif op < 0.85:
            cache.hold("host:/voices", [src])
        elif op < 0.9:
            cache.release("host:/voices", [src])
        elif op < 0.97:
            got = cache.get(*key)
            if got is not None:
                assert_arrays_equal(got, expected_arrays(*key))
        else:
            cache.collect_garbage(grace_s=rnd.choice([0.0, 3600.0]))

main()
"""


def test_survives_sigkill(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    script = child_script(tmp_path, CRASH_CHILD)
    rnd = random.Random(1234)
    hits = 0
    for round_ in range(12):
        child = subprocess.Popen(
            [sys.executable, str(script), str(d), str(round_)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line == b"ready\n", child.stderr.read().decode() if child.stderr else line
            time.sleep(rnd.uniform(0.0, 0.3))
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            _, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err.decode()
        with LocalStore(d, size_limit_bytes=60_000) as c:
            metas = 0
            for i in range(12):
                for producer in PRODUCERS:
                    for kind in KINDS:
                        key = (source(i), producer, kind)
                        got = c.get(*key)
                        if got is not None:
                            hits += 1
                            assert_arrays_equal(got, expected_arrays(*key))
                            assert c.get_meta(*key) == {"key": list(key)}
                            metas += 1
            assert c.stats().misses + c.stats().hits == 12 * len(PRODUCERS) * len(KINDS) + metas
            check_totals(d)
            c.collect_garbage(grace_s=1e9)
            # No orphans: every object on disk has its row and every row its object.
            assert {p.stem for p in object_files(d)} == indexed_objects(d)
            # A temp file the child left is kept (it might be another process's put in
            # flight) until it is old enough.
            for tmp in temp_files(d):
                os.utime(tmp, (time.time() - 120, time.time() - 120))
            c.collect_garbage(grace_s=1e9)
            assert temp_files(d) == []
    assert hits > 20  # the children really wrote entries


# ---------------------------------------------------------------------------- processes

CONCURRENT_CHILD = """
def main() -> None:
    directory, seed, n_sources, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rnd = random.Random(seed)
    cache = LocalStore(directory)
    keys = [(source(i), p, k) for i in range(n_sources) for p in PRODUCERS[:1] for k in KINDS[:2]]
    rnd.shuffle(keys)
    for key in keys:
        cache.put(*key, expected_arrays(*key))
        cache.hold("host:/voices", [key[0]])
    ops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        key = rnd.choice(keys)
        op = rnd.random()
        if op < 0.45:
            cache.put(*key, expected_arrays(*key))
        elif op < 0.95:
            got = cache.get(*key)
            assert got is not None, key
            assert_arrays_equal(got, expected_arrays(*key))
        else:
            cache.collect_garbage(grace_s=3600.0)  # orphan scan while the other process writes
        ops += 1
    cache.close()
    print(ops)

main()
"""


@pytest.mark.parametrize("n_sources", [10, 1], ids=["many-keys", "same-key"])
def test_two_processes(tmp_path: Path, n_sources: int) -> None:
    d = tmp_path / "cache"
    script = child_script(tmp_path, CONCURRENT_CHILD)
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(d), str(seed), str(n_sources), "1.5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in (1, 2)
    ]
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
        assert b"WARNING" not in err, err.decode()  # no entry was ever seen corrupt
        assert int(out) > 10
    with LocalStore(d) as c:
        for i in range(n_sources):
            for kind in KINDS[:2]:
                key = (source(i), PRODUCERS[0], kind)
                assert_arrays_equal(c.get(*key), expected_arrays(*key))
        assert c.stats().entries == n_sources * 2
        assert c.collect_garbage(grace_s=3600.0) == 0
    check_totals(d)
    assert {p.stem for p in object_files(d)} == indexed_objects(d)


# ---------------------------------------------------------------------------- eviction


def test_grace_counts_from_release(cache: LocalStore) -> None:
    a = source(1)
    cache.hold("h", [a])
    cache.put(a, "p@1", "k", {"x": np.zeros(1)})
    assert cache.collect_garbage(grace_s=0.0) == 0  # held
    cache.release("h", [a])
    time.sleep(0.3)
    assert cache.collect_garbage(grace_s=10.0) == 0
    assert cache.collect_garbage(grace_s=0.2) == 1


def test_content_goes_when_its_last_holder_lets_go(cache: LocalStore) -> None:
    """Two daemons sharing one store: what one releases stays while the other holds it."""
    a, b = source(1), source(2)
    cache.hold("host1:/voices", [a, b])
    cache.hold("host2:/voices", [b])
    for src in (a, b):
        cache.put(src, "p@1", "k", {"x": np.zeros(1)})
    cache.release("host1:/voices", [a, b])
    assert cache.holders(b) == ["host2:/voices"] and cache.holders(a) == []
    assert cache.collect_garbage(grace_s=0.0) == 1
    assert not cache.has(a, "p@1", "k") and cache.has(b, "p@1", "k")


def test_retain_makes_the_holds_exact(cache: LocalStore) -> None:
    for i in range(4):
        cache.put(source(i), "p@1", "k", {"x": np.zeros(1)})
    cache.hold("h", [source(0), source(1)])
    cache.hold("other", [source(3)])
    cache.retain("h", [source(1), source(2)])
    assert [cache.holders(source(i)) for i in range(4)] == [[], ["h"], ["h"], ["other"]]
    assert cache.collect_garbage(grace_s=0.0) == 1
    assert [cache.has(source(i), "p@1", "k") for i in range(4)] == [False, True, True, True]
    cache.retain("h", [])
    assert cache.holders(source(1)) == []
    assert isinstance(cache, ArtifactStore)


def test_a_version_1_index_keeps_its_entries(tmp_path: Path) -> None:
    """An index from before the holds (file records in the store) is migrated: entries stay,
    the records go (the library keeps its own now), and nothing is collected within the grace."""
    d = tmp_path / "cache"
    with LocalStore(d) as c:
        c.put(source(1), "p@1", "k", {"x": np.arange(3)})
    conn = sqlite3.connect(d / "index.sqlite")
    with conn:
        conn.execute("DROP TABLE holds")
        conn.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, "
                     "inode INTEGER NOT NULL, sha256 TEXT NOT NULL, last_seen REAL NOT NULL) WITHOUT ROWID")
        conn.execute("INSERT INTO files VALUES ('a.wav', 1, 1, 1, ?, 0)", (source(1),))
        conn.execute("UPDATE unreferenced SET since = 0 WHERE source = ?", (source(1),))  # long past its grace
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with LocalStore(d) as c:
        np.testing.assert_array_equal(c.get(source(1), "p@1", "k")["x"], np.arange(3))
        assert c.collect_garbage(grace_s=3600.0) == 0
        c.hold("h", [source(1)])
        assert c.collect_garbage(grace_s=0.0) == 0
    with sqlite3.connect(d / "index.sqlite") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert conn.execute("PRAGMA user_version").fetchone()[0] == cache_mod.SCHEMA_VERSION
    conn.close()
    assert "files" not in tables and "holds" in tables


def test_unrecorded_source_is_collected_after_grace(cache: LocalStore) -> None:
    # e.g. `voiced embed FILE` for a file outside the voices folder
    cache.put(source(9), "p@1", "k", {"x": np.zeros(1)})
    assert cache.collect_garbage(grace_s=3600.0) == 0
    assert cache.collect_garbage(grace_s=0.0) == 1


def test_evict(cache: LocalStore) -> None:
    for kind in KINDS:
        cache.put(source(1), "p@1", kind, {"x": np.zeros(2)})
    cache.put(source(2), "p@1", "k", {"x": np.zeros(2)})
    assert cache.evict(source(1)) == 3
    assert cache.evict(source(1)) == 0
    assert cache.entries_for(source(1)) == []
    assert len(object_files(cache.directory)) == 1
    check_totals(cache.directory)


def test_size_limit_evicts_lru(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "ACCESS_TOUCH_INTERVAL_S", 0.0)  # record every access
    payload = {"x": np.zeros(1000, np.float64)}  # ~8.3 KB per object
    with LocalStore(tmp_path / "cache") as probe:
        probe.put(source(0), "p@1", "k", payload)
        entry_size = probe.stats().bytes
    with LocalStore(tmp_path / "limited", size_limit_bytes=3 * entry_size) as c:
        for i in (1, 2, 3):
            c.hold("h", [source(i)])
            c.put(source(i), "p@1", "k", payload)
            time.sleep(0.01)
        assert c.get(source(1), "p@1", "k") is not None  # 1 is now the most recent
        time.sleep(0.01)
        c.hold("h", [source(4)])
        c.put(source(4), "p@1", "k", payload)
        assert [c.has(source(i), "p@1", "k") for i in (1, 2, 3, 4)] == [True, False, True, True]
        assert c.stats().bytes <= 3 * entry_size

        # Content nobody holds goes first, even if more recently used.
        c.release("h", [source(4)])
        c.put(source(5), "p@1", "k", payload)
        assert not c.has(source(4), "p@1", "k")
        assert [c.has(source(i), "p@1", "k") for i in (1, 3, 5)] == [True, True, True]
        assert len(object_files(c.directory)) == 3
        check_totals(c.directory)


# ---------------------------------------------------------------------------- filesystem errors


def test_objects_path_is_a_file(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    d.mkdir()
    (d / "objects").write_text("not a directory")
    with pytest.raises(CacheError, match=str(d / "objects")):
        LocalStore(d)


def test_cache_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="cannot create cache directory"):
        LocalStore(tmp_path / "file" / "cache")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    with LocalStore(d) as c:
        c.put(source(1), "p@1", "k", {"x": np.zeros(1)})
    for sub in (d / "objects").iterdir():
        sub.chmod(0o500)
    (d / "objects").chmod(0o500)
    try:
        with LocalStore(d) as c:
            with pytest.raises(CacheError, match="objects"):
                c.put(source(2), "p@1", "k", {"x": np.zeros(1)})
            assert c.get(source(1), "p@1", "k") is not None
    finally:
        (d / "objects").chmod(0o700)
        for sub in (d / "objects").iterdir():
            sub.chmod(0o700)


DISK_FULL_CHILD = """
import resource, signal
def main() -> None:
    cache = LocalStore(sys.argv[1])
    cache.put(source(1), "p@1", "k", {"x": np.arange(10)}, {"v": 1})
    # Simulate a full disk: writes past 256 KiB fail with EFBIG instead of killing us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
    big = {"x": np.zeros(1 << 20, np.float32)}
    for key in [(source(1), "p@1", "k"), (source(2), "p@1", "k")]:
        try:
            cache.put(*key, big)
        except CacheError as e:
            print("CacheError:", e)
        else:
            print("no error")
    cache.close()

main()
"""


def test_disk_full_leaves_previous_state(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    script = child_script(tmp_path, DISK_FULL_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(d)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2 and all(line.startswith("CacheError: cannot write cache object") for line in lines), lines
    assert str(d / "objects") in lines[0]
    with LocalStore(d) as c:
        np.testing.assert_array_equal(c.get(source(1), "p@1", "k")["x"], np.arange(10))
        assert c.get_meta(source(1), "p@1", "k") == {"v": 1}
        assert not c.has(source(2), "p@1", "k")
        assert c.stats().entries == 1
    assert temp_files(d) == [] and len(object_files(d)) == 1


def test_closed_cache_raises(tmp_path: Path) -> None:
    c = LocalStore(tmp_path / "cache")
    c.close()
    c.close()
    with pytest.raises(CacheError, match="closed"):
        c.get(source(1), "p@1", "k")


def test_objects_dir_wiped_while_open(cache: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    cache.put(source(1), "p@1", "k", {"x": np.zeros(1)})
    shutil.rmtree(cache.directory / "objects")
    with caplog.at_level(logging.WARNING, logger="voiced.store"):
        assert cache.get(source(1), "p@1", "k") is None
    cache.put(source(1), "p@1", "k", {"x": np.ones(1)})
    np.testing.assert_array_equal(cache.get(source(1), "p@1", "k")["x"], np.ones(1))
    assert (cache.directory / "objects").stat().st_mode & 0o777 == 0o700


def test_connections_of_finished_threads_are_closed(cache: LocalStore) -> None:
    def work() -> None:
        cache.has(source(1), "p@1", "k")

    for _ in range(20):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    work()
    assert len(cache._index._conns) <= 2  # this thread's and at most the last worker's


def test_processes_opening_a_fresh_cache_at_once(tmp_path: Path) -> None:
    """The first open switches the index to WAL; processes racing for that must all succeed."""
    code = "import sys; from voiced.store import LocalStore; LocalStore(sys.argv[1]).close()"
    for round_ in range(6):
        directory = tmp_path / f"round{round_}"
        children = [
            subprocess.Popen([sys.executable, "-c", code, str(directory)], stderr=subprocess.PIPE)
            for _ in range(4)
        ]
        for child in children:
            _, err = child.communicate(timeout=60)
            assert child.returncode == 0, err.decode()
