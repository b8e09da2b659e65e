"""A weightless engine for tests that exercise the daemon rather than the voice: one tone per
request, its pitch drawn from the voice's speaker embedding, so different voices sound different
and a reply can be told apart from another voice's. Registered through the same hook as any
engine; point ``[plugins] paths`` at this folder and set ``[engine] name = "tone"``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from voiced.engines.base import Conditioning, Engine
from voiced.hooks import hookimpl


class ToneEngine(Engine):
    """``sentence_s`` (an engine option, default 0): speak sentence by sentence, taking that
    long over each, like a real engine's streaming (for tests that need a request in flight).
    ``refine_s`` (default 0): a second stage, "refined", taking that long in ten steps that
    report progress and give way when told to, like a real engine's refinement.
    ``journal`` (default none): a file each synthesis appends "pid pitch" to, so a bench can
    tell which process spoke which voice (a cluster's routing by voice).
    ``idle_calls`` (default none): a file each call of ``idle`` appends "x" to before it fails,
    as a broken engine's housekeeping would (for tests of the daemon's)."""

    name, version, sample_rate = "tone", "1", 16000
    REFINE_STEPS = 10

    def __init__(self, sentence_s: float = 0.0, refine_s: float = 0.0, journal: str = "", idle_calls: str = "") -> None:
        self.sentence_s, self.refine_s, self.journal = float(sentence_s), float(refine_s), journal
        self.idle_calls = idle_calls
        self.stages = ("ready", "refined") if self.refine_s else ("ready",)
        self.stopped_at: int | None = None

    def load(self, device: str = "auto") -> None:
        self.device = "cpu"  # a tone needs no accelerator

    def idle(self) -> None:
        if self.idle_calls:
            with open(self.idle_calls, "a") as calls:
                calls.write("x")
            raise RuntimeError("tone refuses to tidy up")

    def prepare_voice(self, reference: Any, embedding: np.ndarray, *, stage: str, budget_s: float | None = None,
                      previous: Any = None, should_stop: Any = None, progress: Any = None) -> Conditioning:
        if stage == "refined":
            for step in range(self.REFINE_STEPS):
                if should_stop is not None and should_stop():
                    self.stopped_at = step  # for tests: where the stage gave way
                    break
                time.sleep(self.refine_s / self.REFINE_STEPS)
                if progress is not None:
                    progress((step + 1) / self.REFINE_STEPS)
        pitch = tone_pitch(embedding)
        return Conditioning({"pitch": np.array([pitch], np.float32)}, {"engine": self.name, "stage": stage})

    def default_conditioning(self) -> Conditioning:
        return Conditioning({"pitch": np.array([220.0], np.float32)}, {"engine": self.name, "stage": "stock"})

    def synthesize(self, text: str, conditioning: Conditioning, params: dict[str, Any]) -> Iterator[np.ndarray]:
        pieces = [text] if not self.sentence_s else [s for s in text.split(". ") if s]
        if self.journal:
            with open(self.journal, "a") as journal:
                journal.write(f"{os.getpid()} {float(conditioning['pitch'][0]):.3f}\n")
        for piece in pieces:
            if self.sentence_s:
                time.sleep(self.sentence_s)
            yield self._tone(piece, float(conditioning["pitch"][0]), float(params.get("speed", 1.0) or 1.0))

    def _tone(self, text: str, pitch: float, speed: float) -> np.ndarray:
        t = np.arange(int(0.05 * len(text) / speed * self.sample_rate)) / self.sample_rate
        return (0.2 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def tone_pitch(embedding: np.ndarray) -> float:
    """The tone (Hz) a voice with this embedding speaks in: 100-300 Hz."""
    return 100.0 + 200.0 * float(np.argmax(embedding)) / len(embedding)


@hookimpl
def voiced_register_engines(register: Any) -> None:
    register("tone", lambda context: ToneEngine(**context.options))
