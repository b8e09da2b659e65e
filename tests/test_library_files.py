"""Tests of voiced.library.files: the folder's file records and the content they hold in a real
local store (real sqlite, real object files)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voiced.library.files import FileRecord, FileRecords, holder_name
from voiced.store import LocalStore


def source(i: int) -> str:
    return hashlib.sha256(f"source-{i}".encode()).hexdigest()


@pytest.fixture
def store(tmp_path: Path):
    with LocalStore(tmp_path / "cache") as s:
        yield s


def records_of(store: LocalStore, holder: str = "host:/voices") -> FileRecords:
    return FileRecords(store.directory, holder, store)


def test_records_roundtrip_and_forget(store: LocalStore) -> None:
    files = records_of(store)
    records = [FileRecord(f"dir/v{i}.wav", i * 1000, 1_700_000_000_000_000_000 + i, i, source(i)) for i in range(10_000)]
    files.record(records)
    # how long these take is bench/bench_cache.py's figure, not a test's: it depends on the machine
    assert files.all() == {r.path: r for r in records}
    files.forget(f"dir/v{i}.wav" for i in range(0, 10_000, 2))
    files.forget(["not/recorded.wav"])
    assert len(files.all()) == 5_000
    # Updating a record replaces it.
    files.record([FileRecord("dir/v1.wav", 5, 6, 7, source(0))])
    assert files.all()["dir/v1.wav"] == FileRecord("dir/v1.wav", 5, 6, 7, source(0))
    assert store.holders(source(0)) == ["host:/voices"] and store.holders(source(2)) == []
    files.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=30),
        st.tuples(
            st.integers(0, 2**63 - 1), st.integers(-(2**62), 2**63 - 1), st.integers(0, 2**64 - 1),
            st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        ),
        max_size=20,
    )
)
def test_records_any_values(tmp_path_factory: pytest.TempPathFactory, data: dict) -> None:
    records = {p: FileRecord(p, *v) for p, v in data.items()}
    with LocalStore(tmp_path_factory.mktemp("c")) as store:
        files = records_of(store)
        files.record(records.values())
        assert files.all() == records
        files.close()


def test_grace_period_and_rename(store: LocalStore) -> None:
    files = records_of(store)
    a, b = source(1), source(2)
    files.record([FileRecord("a.wav", 10, 1, 100, a), FileRecord("b.wav", 20, 2, 200, b)])
    for src in (a, b):
        store.put(src, "p@1", "embedding", {"x": np.zeros(4)})
        store.put(src, "p@2", "kokoro/quick", {"x": np.ones(4)})
    assert store.collect_garbage(grace_s=0.0) == 0  # both referenced

    files.forget(["a.wav"])
    assert store.collect_garbage(grace_s=3600.0) == 0  # within grace: kept
    assert len(store.entries_for(a)) == 2

    # Rename b.wav -> sub/c.wav: delete then create with the same content.
    files.forget(["b.wav"])
    files.record([FileRecord("sub/c.wav", 20, 3, 201, b)])

    assert store.collect_garbage(grace_s=0.0) == 2  # a's two entries go; b's stay
    assert store.entries_for(a) == []
    assert len(store.entries_for(b)) == 2
    assert set(files.all()) == {"sub/c.wav"}
    files.close()


def test_changed_content_releases_old_hash(store: LocalStore) -> None:
    files = records_of(store)
    old, new = source(1), source(2)
    files.record([FileRecord("a.wav", 1, 1, 1, old)])
    store.put(old, "p@1", "k", {"x": np.zeros(1)})
    files.record([FileRecord("a.wav", 2, 2, 1, new)])  # the file was edited in place
    store.put(new, "p@1", "k", {"x": np.ones(1)})
    assert store.collect_garbage(grace_s=0.0) == 1
    assert not store.has(old, "p@1", "k") and store.has(new, "p@1", "k")
    files.close()


def test_two_copies_of_one_recording_hold_it_until_both_go(store: LocalStore) -> None:
    files = records_of(store)
    files.record([FileRecord("a.wav", 1, 1, 1, source(1)), FileRecord("copy of a.wav", 1, 1, 2, source(1))])
    store.put(source(1), "p@1", "k", {"x": np.zeros(1)})
    files.forget(["a.wav"])
    assert store.collect_garbage(grace_s=0.0) == 0
    files.forget(["copy of a.wav"])
    assert store.collect_garbage(grace_s=0.0) == 1
    files.close()


def test_two_daemons_sharing_a_store_keep_their_own_records(store: LocalStore, tmp_path: Path) -> None:
    """Each folder has its own records; one folder losing a file leaves the other's voice alone,
    and a start-up sync of one never releases what the other holds."""
    one, two = records_of(store, holder_name(tmp_path / "one")), records_of(store, holder_name(tmp_path / "two"))
    assert one.holder != two.holder
    one.record([FileRecord("voice.wav", 1, 1, 1, source(1))])
    two.record([FileRecord("voice.wav", 1, 1, 9, source(1)), FileRecord("other.wav", 2, 2, 2, source(2))])
    for i in (1, 2):
        store.put(source(i), "p@1", "k", {"x": np.zeros(1)})
    one.forget(["voice.wav"])
    one.sync()
    assert one.all() == {} and set(two.all()) == {"voice.wav", "other.wav"}
    assert store.collect_garbage(grace_s=0.0) == 0
    two.forget(["voice.wav"])
    assert store.collect_garbage(grace_s=0.0) == 1
    assert store.has(source(2), "p@1", "k")
    one.close()
    two.close()


def test_sync_heals_holds_lost_between_the_two_databases(store: LocalStore) -> None:
    """Records written, holds missing (a store replaced, or a crash between the two): sync
    holds the content again; holds without records are released."""
    files = records_of(store)
    files.record([FileRecord("a.wav", 1, 1, 1, source(1))])
    store.put(source(1), "p@1", "k", {"x": np.zeros(1)})
    store.put(source(2), "p@1", "k", {"x": np.zeros(1)})
    store.retain(files.holder, [source(2)])  # what a crash could leave: the wrong holds
    files.sync()
    assert store.holders(source(1)) == [files.holder] and store.holders(source(2)) == []
    assert store.collect_garbage(grace_s=0.0) == 1
    assert store.has(source(1), "p@1", "k")
    files.close()


def test_refused_records_are_kept_until_the_database_takes_them(store: LocalStore, monkeypatch) -> None:
    """A full or read-only disk refuses a record: it is kept in memory and recorded by ``retry``,
    unless its file changed meanwhile."""
    from voiced.errors import CacheError

    files = records_of(store)
    refusing = True
    real_hold = store.hold

    def hold(holder: str, shas) -> None:
        if refusing:
            raise CacheError("no space left on device")
        real_hold(holder, shas)

    monkeypatch.setattr(store, "hold", hold)
    kept = [FileRecord("a.wav", 1, 2, 3, source(1)), FileRecord("b.wav", 4, 5, 6, source(2))]
    assert files.record_or_keep(kept) is False
    assert files.all() == {}
    assert files.retry(lambda r: True) is False  # still refused: still kept
    refusing = False
    assert files.retry(lambda r: r.path == "a.wav") is True  # b.wav changed meanwhile: dropped
    assert files.all() == {"a.wav": kept[0]}
    assert store.holders(source(1)) == ["host:/voices"] and store.holders(source(2)) == []
    assert files.retry(lambda r: True) is True  # nothing left kept
    assert files.all() == {"a.wav": kept[0]}
    files.close()
