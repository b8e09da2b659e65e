"""The speech pipeline: a typed request, a voice and its conditioning in; encoded audio out.

One request walks: text -> ``voiced_preprocess_text`` -> the engine (a chunk per sentence) ->
``voiced_postprocess_audio`` -> the encoder (wav, flac, ogg, mp3, raw PCM) -> pieces to send;
once the reply is on its way, ``voiced_synthesis_done``.

Nothing here touches a socket. A front door admits a request and finds its voice, then
iterates an :class:`Utterance` and sends what it yields, so every door speaks through the same
hooks and the same encoder. Every failure comes out as a :class:`ProtocolError` carrying the
code the client sees, the same for every door.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from voiced.audio_out import AudioWriter
from voiced.errors import VoicedError
from voiced.hooks import PluginError, PluginHost, new_request
from voiced.protocol import BAD_REQUEST, INTERNAL, ProtocolError, Synthesize

log = logging.getLogger(__name__)


class SpeechEngine(Protocol):
    """What the pipeline needs of an engine (every :class:`voiced.engines.Engine` is one)."""

    @property
    def sample_rate(self) -> int: ...

    def synthesize(self, text: str, conditioning: Any, params: Mapping[str, Any]) -> Iterator[np.ndarray]: ...


@dataclass(frozen=True)
class Piece:
    """Encoded audio to send: a stream's chunk (``final`` False) or the reply's last bytes."""

    data: bytes
    seq: int
    final: bool


class Speech:
    """Turns requests into audio with one engine and the daemon's plugins."""

    def __init__(self, engine: SpeechEngine, plugins: PluginHost | None = None) -> None:
        self.engine = engine
        self.plugins = plugins

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def utterance(
        self, request: Synthesize, voice: Mapping[str, Any], conditioning: Any, *,
        request_id: Any = None, on_chunk: Callable[[], None] | None = None,
    ) -> Utterance:
        """One request's trip through the pipeline; ``on_chunk`` is called as each chunk leaves the engine."""
        return Utterance(self, request, voice, conditioning, request_id, on_chunk)


class Utterance:
    """Iterate :meth:`pieces` and send each; then :meth:`finish` (after the reply is sent).

    ``header`` is what every reply message says about the audio; ``duration_s`` and
    ``engine_s`` are complete once the final piece has been yielded.
    """

    def __init__(
        self, speech: Speech, request: Synthesize, voice: Mapping[str, Any], conditioning: Any,
        request_id: Any, on_chunk: Callable[[], None] | None,
    ) -> None:
        self.speech = speech
        self.request = request
        self.voice = voice
        self.conditioning = conditioning
        self.request_id = request_id
        self._on_chunk = on_chunk
        self.header: dict[str, Any] = {
            "sample_rate": request.sample_rate or speech.sample_rate,
            "channels": 1,
            "format": request.format,
            "voice": {"name": voice.get("name"), "sha256": voice.get("sha256")},
        }
        if voice.get("stage"):
            self.header["voice"]["stage"] = voice["stage"]
        self.engine_s = 0.0
        self.duration_s = 0.0
        self.seq = 0  # stream chunks yielded before the final piece
        self._info: dict[str, Any] = {}  # the ``request`` dict the hooks see
        self._kept: list[np.ndarray] = []  # the reply's audio, for whole-reply post-processing and synthesis_done
        self._keep = False

    def pieces(self) -> Iterator[Piece]:
        """The encoded reply; raises :class:`ProtocolError` (the client's error code) on any failure."""
        try:
            yield from self._pieces()
        except PluginError as exc:  # before VoicedError: a plugin's failure is ours, not the client's
            raise ProtocolError(INTERNAL, str(exc)) from exc
        except ProtocolError:
            raise
        except (VoicedError, ValueError) as exc:
            raise ProtocolError(BAD_REQUEST, str(exc)) from exc
        except Exception as exc:
            log.exception("synthesis failed for voice %s", self.voice.get("name"))
            raise ProtocolError(INTERNAL, f"synthesis failed: {type(exc).__name__}: {exc}") from exc

    def _pieces(self) -> Iterator[Piece]:
        writer = AudioWriter(self.request.format, self.speech.sample_rate, self.request.sample_rate)
        try:
            yield from self._encoded(writer)
        finally:
            writer.close()

    def _encoded(self, writer: AudioWriter) -> Iterator[Piece]:
        request, plugins, rate = self.request, self.speech.plugins, self.speech.sample_rate
        text, params, stream = request.text, request.params, request.stream
        post = False
        if plugins is not None:
            self._info = new_request(text=text, voice=self.voice, params=params, fmt=request.format, stream=stream,
                                     request_id=self.request_id)
            text = plugins.preprocess_text(text, str(self.voice.get("name")), params)
            self._info["spoken_text"] = text
            post = plugins.has_hook("voiced_postprocess_audio")
            self._keep = plugins.has_hook("voiced_synthesis_done")
        body: list[bytes] = []
        for chunk in self._chunks(text, params):
            if stream:
                if post:
                    chunk = plugins.postprocess_audio(chunk, rate, {**self._info, "seq": self.seq, "final": False})
                if self._keep:
                    self._kept.append(chunk)
                yield Piece(writer.feed(chunk), self.seq, final=False)
                self.seq += 1
            elif post or self._keep:
                self._kept.append(chunk)  # whole replies are post-processed as one signal
            else:
                body.append(writer.feed(chunk))
        if stream and post:  # the end of a stream: plugins may add a tail (e.g. padding)
            end = plugins.postprocess_audio(np.zeros(0, np.float32), rate,
                                            {**self._info, "seq": self.seq, "final": True})
            if self._keep:
                self._kept.append(end)
            body.append(writer.feed(end))
        elif not stream and (post or self._keep):
            whole = np.concatenate(self._kept) if self._kept else np.zeros(0, np.float32)
            if post:
                whole = plugins.postprocess_audio(whole, rate, {**self._info, "seq": 0, "final": True})
            self._kept = [whole]
            body.append(writer.feed(whole))
        tail = writer.finish()
        self.duration_s = writer.duration_s
        yield Piece(b"".join(body) + tail, self.seq, final=True)

    def _chunks(self, text: str, params: Mapping[str, Any]) -> Iterator[np.ndarray]:
        """The engine's chunks, with the time spent inside the engine counted."""
        started = time.monotonic()
        chunks = self.speech.engine.synthesize(text, self.conditioning, params)  # the text front end runs here
        self.engine_s += time.monotonic() - started
        while True:
            started = time.monotonic()
            try:
                chunk = next(chunks)
            except StopIteration:
                self.engine_s += time.monotonic() - started
                return
            self.engine_s += time.monotonic() - started
            if self._on_chunk is not None:
                self._on_chunk()
            yield chunk

    def finish(self, timings: Mapping[str, Any]) -> None:
        """Run ``voiced_synthesis_done`` with the whole reply's audio; never raises."""
        plugins = self.speech.plugins
        if not self._keep or plugins is None:
            return
        audio = np.concatenate(self._kept) if self._kept else np.zeros(0, np.float32)
        plugins.synthesis_done({**self._info, "seq": self.seq, "final": True}, audio, self.speech.sample_rate, timings)
