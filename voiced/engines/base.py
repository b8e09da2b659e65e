"""The interface every synthesis engine implements, and the errors engines raise.

An engine turns (text, conditioning) into 24 kHz-ish float32 audio, chunk by chunk. The
conditioning is what a voice is prepared into once, ahead of time, from a reference recording
and its speaker embedding; it must be storable as an ``.npz`` (no pickle) plus a small JSON meta,
so the daemon can cache it on disk keyed by (engine name, engine version, file, stage).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from voiced.errors import VoicedError, short_repr

__all__ = [
    "Conditioning",
    "Engine",
    "EngineError",
    "ParamError",
    "SpeakerEncoder",
    "TextError",
    "check_seed",
    "check_speed",
    "reports_progress",
    "whole_number",
]


class EngineError(VoicedError, ValueError):
    """An engine cannot do what it was asked; the message is one clear line for the user.

    It subclasses ValueError because nearly every case is a bad argument (bad params, bad text,
    an unusable conditioning); failures of the engine itself (weights missing, corrupt) also
    use it so callers need to catch one type only.
    """


class TextError(EngineError):
    """The text cannot be spoken: empty, nothing pronounceable, too long, unsupported language."""


class ParamError(EngineError):
    """A synthesis parameter is missing, of the wrong type or out of range."""


class SpeakerEncoder(Protocol):
    """A speaker encoder as the library and the engines use it: 16 kHz mono audio in, a
    unit-norm embedding out. ``model_id`` and ``version`` name the model, so artefacts made
    with it are keyed by them and made again when it changes (``voiced.encoder`` has GE2E)."""

    model_id: str
    version: str

    def embed(self, wav: np.ndarray, *, preprocess: bool = True) -> np.ndarray: ...


@dataclass(frozen=True)
class Conditioning(Mapping[str, np.ndarray]):
    """A prepared voice: named float arrays (stored as npz) plus a small JSON-able ``meta``.

    It behaves as a read-only mapping of its arrays, so ``np.savez(path, **cond)`` stores it and
    ``Conditioning.from_npz(np.load(path), meta)`` restores it.
    """

    arrays: Mapping[str, np.ndarray]
    meta: Mapping[str, Any] = field(default_factory=dict)
    key: tuple[str, str, str] | None = field(default=None, compare=False)
    """Where the store keeps it ((source, producer, kind)), if it came from there: a synthesis
    replica elsewhere loads it by this key instead of receiving the arrays."""

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    @classmethod
    def from_npz(cls, npz: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None,
                 key: tuple[str, str, str] | None = None) -> Conditioning:
        """Rebuild from a loaded npz (``np.load(path, allow_pickle=False)``) and its meta."""
        return cls({k: np.asarray(npz[k]) for k in npz}, dict(meta or {}), key)


class Engine(abc.ABC):
    """A text-to-speech engine that can be conditioned on a reference voice.

    Lifecycle: construct (cheap, no weights), ``load(device)`` once (loads and warms up), then
    ``prepare_voice`` / ``synthesize`` from any thread; implementations serialise internally
    where their backend is not thread-safe.
    """

    #: Short identifier, e.g. "kokoro"; part of every cache key.
    name: str
    #: Changes whenever cached conditionings or audio from this engine would differ.
    version: str
    #: Rate of the audio ``synthesize`` yields, in Hz.
    sample_rate: int
    #: Preparation stages, cheapest first; each later one may start from the previous result.
    stages: tuple[str, ...]

    @abc.abstractmethod
    def load(self, device: str = "auto") -> None:
        """Load the model on ``device`` ("auto" | "cpu" | "cuda" | "cuda:N") and warm it up."""

    @abc.abstractmethod
    def prepare_voice(
        self,
        reference: np.ndarray,
        embedding: np.ndarray,
        *,
        stage: str,
        budget_s: float | None = None,
        previous: Conditioning | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Conditioning:
        """Prepare a voice from a 16 kHz mono float32 ``reference`` and its (256,) ``embedding``.

        ``stage`` is one of ``stages``; ``budget_s`` bounds the effort (None: engine default);
        ``previous`` is the result of an earlier stage to start from; ``should_stop`` is polled
        between steps and, when it returns True, the best result so far is returned early (the
        daemon then discards it and runs the stage again later). The daemon's ``should_stop`` may
        block while synthesis requests are served: the stage is paused, so an engine's time
        budget should leave out the time spent inside ``should_stop``, and an engine must not
        hold anything its ``synthesize`` needs while it calls it (the daemon gives up on a stage
        paused for a minute).

        An engine whose ``prepare_voice`` also takes a keyword ``progress`` is given a callable
        to tell the share of the stage's work done (0-1) as it goes; ``voiced voices`` shows it.
        Engines without the keyword are called as before.
        """

    @abc.abstractmethod
    def synthesize(self, text: str, conditioning: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at ``sample_rate``, one per sentence or clause.

        Raises TextError for unspeakable text and ParamError for bad ``params`` before yielding
        anything, so a server can answer with an error instead of a truncated stream.
        """

    def default_conditioning(self) -> Conditioning:
        """A stock voice, usable before any reference is prepared."""
        raise NotImplementedError

    def idle(self) -> None:
        """Called by the daemon about once a second from its housekeeping thread, busy or not.

        An engine may give back memory it has not needed for a while, such as buffers grown for
        the longest input it ran. It must stay safe while other threads synthesize. Default: nothing.
        """


def check_speed(params: Mapping[str, Any], lo: float = 0.5, hi: float = 2.0) -> float:
    """Validate ``params['speed']`` (default 1.0) as a finite number within [lo, hi]."""
    raw = params.get("speed", 1.0)
    if isinstance(raw, bool) or not isinstance(raw, (int, float, np.integer, np.floating)):
        raise ParamError(f"speed must be a number, got {type(raw).__name__}")
    if not lo <= raw <= hi or not np.isfinite(raw):  # compared before float(): a 400-digit int overflows it
        raise ParamError(f"speed must be a number within {lo}..{hi}, got {short_repr(raw)}")
    return float(raw)


def whole_number(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int within [low, high]; booleans and floats are refused (ParamError)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise ParamError(f"{name} must be a whole number {bounds}, got {value!r}")
    return int(value)


def check_seed(params: Mapping[str, Any]) -> int:
    """Validate ``params['seed']`` (default 0) as a non-negative integer below 2**32."""
    raw = params.get("seed", 0)
    return 0 if raw is None else whole_number("seed", raw, 0, 2**32 - 1)


def reports_progress(engine: Engine) -> bool:
    """Whether ``engine.prepare_voice`` takes the keyword ``progress`` (named, or through **kwargs)."""
    try:
        parameters = inspect.signature(engine.prepare_voice).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "progress" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
