"""wyoming: a Wyoming text-to-speech service, so Home Assistant's voice pipeline speaks in your voices.

Home Assistant's Wyoming integration (and any Wyoming client) connects here. ``describe`` is
answered with every ready voice as a TTS voice, so voices appear and disappear as their files
do; ``synthesize`` with ``audio-start``, ``audio-chunk``s (16-bit mono PCM at the engine's rate)
and ``audio-stop``. Streaming synthesis is supported: the text of ``synthesize-chunk`` events is
spoken sentence by sentence as sentences complete, and ``synthesize-stop`` is answered, after the
last audio, with ``synthesize-stopped``. A failure is an ``error`` event with the daemon's code.
Requests take the daemon's own path: the same queue, voices, limits and post-processing hooks
as ZeroMQ requests.

    [plugins]
    enabled = ["wyoming"]

    [plugins.wyoming]
    listen = "tcp://127.0.0.1:10200"
    # allow_network = true     # to listen beyond loopback: Wyoming has no authentication
    # default_voice = "alice"  # for requests that name none (else the first ready voice by name)

Wyoming clients cannot authenticate, so a non-loopback ``listen`` needs ``allow_network = true``
(the ZeroMQ side likewise refuses the network without CURVE unless told ``allow_insecure``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize as WySynthesize
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeTextFormat

from voiced import __version__
from voiced.doors import AsyncReply, LoopThread, bind_tcp, require_voice, shown_address, split_listen
from voiced.hooks import PluginSettings, SynthesisService, hookimpl
from voiced.protocol import VOICE_NOT_FOUND, ProtocolError, Synthesize
from voiced.security import is_loopback

log = logging.getLogger(__name__)

SAMPLES_PER_CHUNK = 2048  # about 85 ms at 24 kHz: small enough for a satellite to start playing at once
WIDTH = 2  # bytes per sample: 16-bit PCM

# the end of a sentence: terminal punctuation, closing quotes or brackets, then white space
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+")


@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):
    listen: str = "tcp://127.0.0.1:10200"
    """tcp://host:port to serve Wyoming on (port 0 picks a free one)."""
    allow_network: bool = False
    """Listen on a non-loopback address although Wyoming clients cannot authenticate."""
    default_voice: str = ""
    """The voice for requests that name none; empty: the first ready voice by name."""
    languages: tuple[str, ...] = ("en",)
    """The languages every voice is listed with (Home Assistant filters voices by them)."""
    wait_s: float = 30.0
    """How long a request waits for a voice that is still being prepared."""

    def __post_init__(self) -> None:
        if not self.listen.startswith("tcp://"):
            raise ValueError(f"listen: expected tcp://host:port, got {self.listen!r}")
        split_listen(self.listen[len("tcp://"):])
        if not self.allow_network and not is_loopback(self.listen):
            raise ValueError(f"listen: {self.listen} is not a loopback address, and Wyoming clients cannot "
                             f"authenticate; set allow_network = true to serve the network anyway")
        if not self.languages:
            raise ValueError("languages: name at least one")
        if not 0 <= self.wait_s <= 3600:
            raise ValueError(f"wait_s: must be within 0..3600, got {self.wait_s}")


def complete_sentences(text: str) -> tuple[str, str]:
    """``text`` split after its last complete sentence: (what can be spoken now, the rest)."""
    end = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
    return text[:end], text[end:]


class WyomingDoor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service: SynthesisService | None = None
        self._loop: LoopThread | None = None
        self._server: asyncio.AbstractServer | None = None

    @hookimpl
    def voiced_serve(self, service: SynthesisService) -> None:
        self.service = service
        host, port = split_listen(self.settings.listen[len("tcp://"):])
        sock = bind_tcp(host, port, "[plugins.wyoming] listen")
        address = shown_address(sock)
        self._loop = LoopThread("wyoming")
        try:
            self._server = self._loop.call(asyncio.start_server(self._connected, sock=sock))
        except BaseException:
            sock.close()
            self._loop.stop()
            raise
        log.info("wyoming: listening on tcp://%s%s", address,
                 "" if is_loopback(f"tcp://{address}") else " (any client on the network can use it)")

    @hookimpl
    def voiced_shutdown(self) -> None:
        if self._loop is None:
            return
        if self._server is not None:
            self._server.close()
        self._loop.stop()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Session(self, reader, writer).run()

    # what the sessions ask of the daemon

    def info(self) -> Info:
        us = Attribution(name="voiced", url="")  # no home page to point at
        voices = [TtsVoice(name=v["name"], attribution=us, installed=True, version=None,
                           description=f"{v['name']} ({v.get('stage') or 'ready'})",
                           languages=list(self.settings.languages))
                  for v in sorted(self.service.voices(), key=lambda v: v["name"]) if v.get("state") == "ready"]
        return Info(tts=[TtsProgram(name="voiced", attribution=us, installed=True, version=__version__,
                                    description="voices cloned from reference recordings", voices=voices,
                                    supports_synthesize_streaming=True)])

    def pick_voice(self, asked: str | None) -> str:
        if asked:
            return asked
        if self.settings.default_voice:
            return self.settings.default_voice
        ready = sorted(v["name"] for v in self.service.voices() if v.get("state") == "ready")
        if not ready:
            raise ProtocolError(VOICE_NOT_FOUND, "no voice is ready yet: add a recording to the voices folder")
        return ready[0]


class Session(AsyncEventHandler):
    """One client connection: events are handled in order, one synthesis at a time."""

    def __init__(self, door: WyomingDoor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.door = door
        self.streaming = False  # inside synthesize-start ... synthesize-stop
        self.voice: str | None = None
        self.pending = ""  # streamed text not yet spoken (no complete sentence in it yet)
        self.started = False  # audio-start sent for this answer
        self.failed = False  # this answer already carried an error

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.door.info().event())
        elif SynthesizeStart.is_type(event.type):
            start = SynthesizeStart.from_event(event)
            self.streaming, self.pending, self.started, self.failed = True, "", False, False
            self.voice = start.voice.name if start.voice is not None else None
        elif SynthesizeChunk.is_type(event.type):
            if self.streaming:
                now, self.pending = complete_sentences(self.pending + SynthesizeChunk.from_event(event).text)
                await self.speak(now, last=False)
        elif SynthesizeStop.is_type(event.type):
            if self.streaming:
                rest, self.pending, self.streaming = self.pending, "", False
                await self.speak(rest, last=True)
                await self.write_event(SynthesizeStopped().event())
        elif WySynthesize.is_type(event.type):
            # inside a stream it repeats the streamed text, for servers that cannot stream: not spoken twice
            if not self.streaming:
                request = WySynthesize.from_event(event)
                self.voice = request.voice.name if request.voice is not None else None
                self.started = self.failed = False
                if request.text_format not in (None, SynthesizeTextFormat.TEXT):
                    await self.error("bad_request", f"text_format {request.text_format} is not supported; send text")
                else:
                    await self.speak(request.text, last=True)
        else:
            log.debug("wyoming: ignoring a %s event", event.type)
        return True

    async def error(self, code: str, message: str) -> None:
        self.failed = True
        await self.write_event(Error(text=message, code=code).event())

    async def speak(self, text: str, *, last: bool) -> None:
        """Speak ``text`` (may be empty) as part of the current answer; ``last`` ends it."""
        if text.strip() and not self.failed:
            answer = AsyncReply(asyncio.get_running_loop())
            try:
                voice = self.door.pick_voice(self.voice)
                require_voice(self.door.service, voice)
                self.door.service.submit(Synthesize(text=text, voice=voice, format="pcm_s16le", stream=True,
                                                    wait_s=self.door.settings.wait_s), answer)
            except ProtocolError as exc:
                await self.error(exc.code, exc.message)
                return
            try:
                while True:
                    item = await answer.next()
                    if item[0] == "fail":
                        await self.error(item[1].code, item[1].message)
                        return
                    await self.audio(item[1], item[2])
                    if item[0] == "done":
                        break
            finally:
                answer.gone = True
        if last and not self.failed:  # every answer ends with audio-stop, even one without audio
            if not self.started:
                await self.audio({"sample_rate": self.door.service.sample_rate}, b"")
            await self.write_event(AudioStop().event())

    async def audio(self, header: Mapping[str, Any], data: bytes) -> None:
        rate = int(header["sample_rate"])
        if not self.started:
            self.started = True
            await self.write_event(AudioStart(rate=rate, width=WIDTH, channels=1).event())
        step = SAMPLES_PER_CHUNK * WIDTH
        for i in range(0, len(data), step):
            await self.write_event(AudioChunk(rate=rate, width=WIDTH, channels=1, audio=data[i:i + step]).event())


def plugin(settings: Settings) -> WyomingDoor:
    return WyomingDoor(settings)
