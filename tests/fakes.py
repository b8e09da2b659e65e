"""Stand-ins the tests share, for parts of the daemon a test does not run for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from voiced.protocol import VOICE_FAILED, VOICE_NOT_FOUND, ProtocolError

# A plugin folder with weightless engines (``tone``), registered through the engine hook like any
# other: ``{"plugins": {"paths": [FAKE_ENGINES]}, "engine": {"name": "tone"}}``.
FAKE_ENGINES = Path(__file__).parent / "fake_engines"


class Shelf:
    """The daemon's side as the server sees it: voices by name and state (ready, preparing,
    failed...), every ready one spoken with ``conditioning``."""

    def __init__(self, conditioning: Any = None, **states: str) -> None:
        self.conditioning = conditioning
        self.states = dict(states)

    def voices(self) -> list[dict[str, Any]]:
        return [{"name": name, "state": state} for name, state in self.states.items()]

    def voice_for_synthesis(self, name: str) -> tuple[dict[str, Any], Any] | None:
        state = self.states.get(name)
        if state is None:
            raise ProtocolError(VOICE_NOT_FOUND, f"no voice named {name!r}")
        if state == "failed":
            raise ProtocolError(VOICE_FAILED, f"voice {name!r} failed")
        if state != "ready":
            return None
        return {"name": name, "sha256": "ab" * 32}, self.conditioning if self.conditioning is not None else f"conditioning of {name}"

    def status(self) -> dict[str, Any]:
        return {}

    def embed(self, name: str) -> dict[str, Any]:
        return {}

    def reload(self) -> None:
        pass


class TickingClock:
    """A clock for a fit that moves ``tick`` seconds at each reading: the fit's time then depends
    on the work it does, never on the machine's speed or load."""

    def __init__(self, tick: float = 0.0) -> None:
        self.tick, self.t, self.reads = tick, 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        self.t += self.tick
        return self.t
