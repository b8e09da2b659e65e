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


def tone_of(pcm16: bytes, rate: int) -> float:
    """The strongest frequency (Hz) of 16-bit PCM: which voice the tone engine spoke in."""
    import numpy as np

    samples = np.frombuffer(pcm16, "<i2").astype(np.float32)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum)) * rate / len(samples)


def tone_voices(daemon: Any, clips: Path, names: tuple[str, str], sample_rate: int | None = None) -> dict[str, float]:
    """Copy the clips ``names`` (``clips/NAME.wav``) into a tone-engine daemon's folder, wait for
    them, and return the tone (Hz) each voice speaks in, through ZeroMQ at ``sample_rate``."""
    import shutil

    for name in names:
        shutil.copyfile(clips / f"{name}.wav", daemon.voices / f"{name}.wav")
    tones = {}
    for name in names:
        daemon.wait_ready(name)
        with daemon.client() as client:
            reply = client.synthesize("A reference tone.", voice=name, format="pcm_s16le", sample_rate=sample_rate)
            tones[name] = tone_of(reply.audio, reply.header["sample_rate"])
    assert abs(tones[names[0]] - tones[names[1]]) > 10, tones  # distinct voices, told apart by pitch
    return tones


def mixed_load(door: Any, zeromq_client: Any, zeromq: Any, voices: tuple[str, str], clients: int = 4,
               requests: int = 4) -> list[tuple[str, str, bytes]]:
    """``clients`` threads speaking through another door, ``door(voice, text) -> pcm``, and as
    many through ZeroMQ, ``zeromq(client, voice, text) -> pcm`` on a client each from
    ``zeromq_client()``, all at once, ``requests`` each, each request with its own text length
    and voice: (voice, text, pcm) of every reply, for the caller to check that none is mixed.
    Raises the first error a thread met."""
    import threading

    results: list[tuple[str, str, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(k: int, word: str, first: int, speak: Any) -> None:
        try:
            for i in range(requests):
                voice, text = voices[(k + i + first) % 2], f"{word} " * (3 + first + 2 * k + i)
                pcm = speak(voice, text)
                with lock:
                    results.append((voice, text, pcm))
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    def through_zeromq(k: int) -> None:
        with zeromq_client() as client:
            run(k, "term", 1, lambda voice, text: zeromq(client, voice, text))

    threads = [threading.Thread(target=run, args=(k, "word", 0, door)) for k in range(clients)]
    threads += [threading.Thread(target=through_zeromq, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert len(results) == 2 * clients * requests, len(results)
    return results
