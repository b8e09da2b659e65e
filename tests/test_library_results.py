"""Tests of voiced.library.results: write-behind and the hot set over a real local store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from voiced.engines.base import Conditioning
from voiced.errors import CacheError
from voiced.library.results import NOT_CACHED, Results
from voiced.store import LocalStore


def source(i: int) -> str:
    return hashlib.sha256(f"source-{i}".encode()).hexdigest()


class RefusingStore(LocalStore):
    """A real store whose puts can be refused, as a full or read-only folder refuses them (the
    reliability suite does that with a real full tmpfs; a unit test cannot mount one)."""

    refuse = False

    def put(self, *args, **kwargs) -> None:  # type: ignore[override]
        if self.refuse:
            raise CacheError("no space left on device")
        super().put(*args, **kwargs)


@pytest.fixture
def store(tmp_path: Path):
    with RefusingStore(tmp_path / "cache") as s:
        yield s


def result(kind: str, value: float) -> tuple[str, str, dict[str, np.ndarray], dict[str, float]]:
    return (kind, "p@1", {"x": np.full(3, value, np.float32)}, {"value": value})


def test_published_results_are_read_before_they_are_stored(store: RefusingStore) -> None:
    results = Results(store)
    sha = source(1)
    results.publish(sha, [result("embedding", 1.0), result("quick", 2.0)])
    assert not store.has(sha, "p@1", "embedding")
    key = (sha, "p@1", "embedding")
    assert results.has(key) and results.meta(key) == {"value": 1.0}
    np.testing.assert_array_equal(results.arrays(key)["x"], np.full(3, 1.0))
    assert results.store_published(sha, [result("embedding", 1.0), result("quick", 2.0)]) is None
    assert store.has(sha, "p@1", "embedding") and store.has(sha, "p@1", "quick")
    assert results.meta((sha, "p@1", "quick")) == {"value": 2.0}  # now from the store
    assert not results.has((sha, "p@1", "refined"))


def test_refused_results_stay_in_memory_until_the_store_takes_them(store: RefusingStore) -> None:
    results = Results(store)
    sha, gone = source(1), source(2)
    store.refuse = True
    for s in (sha, gone):
        results.publish(s, [result("embedding", 1.0)])
        note = results.store_published(s, [result("embedding", 1.0)])
        assert note is not None and note.startswith(NOT_CACHED) and "no space" in note
    assert results.has((sha, "p@1", "embedding")) and not store.has(sha, "p@1", "embedding")
    assert results.retry({sha, gone}) == (0, set())
    store.refuse = False
    assert results.retry({sha}) == (1, {sha})  # gone's result: no voice has it, dropped
    assert store.has(sha, "p@1", "embedding") and not store.has(gone, "p@1", "embedding")
    assert not results.has((gone, "p@1", "embedding"))
    assert results.retry({sha}) == (0, set())


def test_the_hot_set_keeps_the_voices_being_spoken(store: RefusingStore) -> None:
    results = Results(store, hot_voices=2)
    for i in range(3):
        store.put(source(i), "p@1", "quick", {"style": np.full(4, i, np.float32)}, {"i": i})
    first = results.conditioning((source(0), "p@1", "quick"))
    assert isinstance(first, Conditioning) and first.meta == {"i": 0}
    assert results.conditioning((source(0), "p@1", "quick")) is first  # from memory
    results.conditioning((source(1), "p@1", "quick"))
    results.conditioning((source(0), "p@1", "quick"))  # 0 is the most recent again
    results.conditioning((source(2), "p@1", "quick"))  # 1 leaves the hot set, 0 stays
    assert results.conditioning((source(0), "p@1", "quick")) is first
    assert results.conditioning((source(1), "p@1", "quick")) is not None  # read again from the store
    assert results.conditioning((source(9), "p@1", "quick")) is None
