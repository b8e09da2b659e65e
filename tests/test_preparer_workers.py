"""Several preparation workers (a cluster's preparers take the stages): background stages run
side by side, one worker stays free for new files, and a stage no longer gives way to them."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from voiced.config import VoicesConfig
from voiced.engines.base import Conditioning, Engine
from voiced.library import Library
from voiced.store import LocalStore
from voiced.watcher import FolderWatcher

TIMEOUT = 60.0


class GatedEngine(Engine):
    """The "refined" stage holds until the test opens the gate, counting who is inside."""

    name, version, sample_rate, stages = "gated", "1", 16000, ("ready", "refined")

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Condition()
        self.running = self.most = self.gave_way = 0

    def load(self, device: str = "auto") -> None:
        self.device = "cpu"

    def prepare_voice(self, reference: Any, embedding: np.ndarray, *, stage: str, budget_s: float | None = None,
                      previous: Any = None, should_stop: Any = None) -> Conditioning:
        if stage == "refined":
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
                self.lock.notify_all()
            try:
                while not self.gate.wait(0.02):
                    if should_stop is not None and should_stop():
                        with self.lock:
                            self.gave_way += 1
                        break
            finally:
                with self.lock:
                    self.running -= 1
                    self.lock.notify_all()
        return Conditioning({"x": np.zeros(1, np.float32)}, {"stage": stage})

    def default_conditioning(self) -> Conditioning:
        return Conditioning({"x": np.zeros(1, np.float32)}, {"stage": "stock"})

    def synthesize(self, text: str, conditioning: Any, params: Any) -> Iterator[np.ndarray]:
        yield np.zeros(160, np.float32)


@pytest.fixture
def library(tmp_path: Path, speaker_encoder: Any) -> Iterator[tuple[Library, GatedEngine, Path]]:
    voices = tmp_path / "voices"
    voices.mkdir()
    config = VoicesConfig(dir=voices, settle_s=0.3, min_duration_s=1.0, rename_grace_s=0.0)
    engine = GatedEngine()
    cache = LocalStore(tmp_path / "cache")
    lib = Library(config, cache, speaker_encoder, engine=engine, workers=3)
    lib.start()
    watcher = FolderWatcher(lib, config)
    watcher.start()
    yield lib, engine, voices
    engine.gate.set()
    watcher.stop()
    lib.stop()
    cache.close()


def voice(lib: Library, name: str) -> dict[str, Any] | None:
    return next((v for v in lib.voices() if v["name"] == name), None)


def test_stages_run_side_by_side_and_new_files_do_not_wait(library: Any, testdata_dir: Path) -> None:
    lib, engine, voices = library
    for name in ("allison_a", "carlo_a", "june_a"):
        shutil.copyfile(testdata_dir / "voices" / f"{name}.wav", voices / f"{name}.wav")
    with engine.lock:  # two of the three workers take a stage each; the third is kept for new files
        assert engine.lock.wait_for(lambda: engine.running == 2, TIMEOUT), engine.running
    shutil.copyfile(testdata_dir / "voices" / "june_b.wav", voices / "june_b.wav")
    assert lib.wait_for(lambda: (voice(lib, "june_b") or {}).get("state") == "ready", TIMEOUT), voice(lib, "june_b")
    time.sleep(0.3)  # time enough for a stage that wrongly gives way to notice the new file
    assert engine.running == 2 and engine.gave_way == 0 and engine.most == 2
    engine.gate.set()
    names = ("allison_a", "carlo_a", "june_a", "june_b")
    assert lib.wait_for(lambda: all((voice(lib, n) or {}).get("stage") == "refined" for n in names), TIMEOUT), \
        lib.voices()
    assert engine.most == 2 and engine.gave_way == 0
    assert lib.queue_depth() == 0
