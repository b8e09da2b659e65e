"""The Wyoming door (plugins/wyoming.py), driven by the ``wyoming`` library's own client against
the real daemon: Kokoro for the audio, the weightless tone engine for load and mixing."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from fakes import FAKE_ENGINES, mixed_load, tone_of, tone_voices

from voiced.config import PluginsConfig
from voiced.errors import ConfigError
from voiced.hooks import PluginHost
from voiced.testing import DaemonProcess, free_port

pytest.importorskip("wyoming")

from wyoming.audio import AudioChunk, AudioStart  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.tts import (  # noqa: E402
    Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice,
)

from plugins.wyoming import complete_sentences  # noqa: E402

TEXT = "Home Assistant asks, and the daemon answers. In the voice you gave it."
ENDS = ("audio-stop", "synthesize-stopped", "error")


def door(tmp_path: Path, engine: dict[str, Any], **door_settings: Any) -> tuple[DaemonProcess, int]:
    port = free_port()
    settings = {
        "engine": engine,
        "plugins": {"enabled": ["wyoming"], "paths": [FAKE_ENGINES]},
        "plugins.wyoming": {"listen": f"tcp://127.0.0.1:{port}", **door_settings},
    }
    return DaemonProcess(tmp_path, settings), port


def exchange(port: int, *events: Any, until: str = "audio-stop") -> list[Event]:
    """Send ``events`` on one connection; the events answered, up to ``until`` (or an error)."""
    async def run() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=120) as client:
            for event in events:
                await client.write_event(event.event())
            got: list[Event] = []
            while True:
                event = await client.read_event()
                assert event is not None, f"the connection closed after {[e.type for e in got]}"
                got.append(event)
                if event.type in (until, "error"):
                    return got

    return asyncio.run(run())


def pcm(events: list[Event]) -> bytes:
    return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))


@pytest.fixture(scope="module")
def kokoro(tmp_path_factory: pytest.TempPathFactory, testdata_dir: Path, kokoro_models: Any) -> Any:
    d, port = door(tmp_path_factory.mktemp("wyoming-kokoro"), {"refine_budget_s": 0})
    kokoro_models(d.cache_dir / "models")
    d.start()
    try:
        shutil.copyfile(testdata_dir / "voices" / "allison_a.wav", d.voices / "allison.wav")
        d.wait_ready("allison", stage="refined")
        yield d, port
    finally:
        assert d.stop() == 0


def test_describe_lists_the_ready_voices_as_the_folder_changes(kokoro: Any, testdata_dir: Path) -> None:
    d, port = kokoro
    (info_event,) = exchange(port, Describe(), until="info")
    (program,) = Info.from_event(info_event).tts
    assert program.supports_synthesize_streaming and [v.name for v in program.voices] == ["allison"]
    assert program.voices[0].languages == ["en"] and program.voices[0].installed
    shutil.copyfile(testdata_dir / "voices" / "june_a.wav", d.voices / "june.wav")
    d.wait_ready("june")
    (program,) = Info.from_event(exchange(port, Describe(), until="info")[0]).tts
    assert [v.name for v in program.voices] == ["allison", "june"]
    (d.voices / "june.wav").unlink()
    d.wait_voice("june", lambda v: v is None)
    (program,) = Info.from_event(exchange(port, Describe(), until="info")[0]).tts
    assert [v.name for v in program.voices] == ["allison"]


def test_synthesize_answers_audio_start_chunks_stop_with_the_zeromq_replys_audio(kokoro: Any) -> None:
    d, port = kokoro
    events = exchange(port, Synthesize(text=TEXT, voice=SynthesizeVoice(name="allison")))
    assert events[0].type == "audio-start" and events[-1].type == "audio-stop"
    assert {e.type for e in events[1:-1]} == {"audio-chunk"} and len(events) > 10
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    with d.client() as client:
        whole = client.synthesize(TEXT, voice="allison", format="pcm_s16le")
    assert pcm(events) == whole.audio  # the same path: the same samples
    # a request naming no voice gets the first ready one
    assert pcm(exchange(port, Synthesize(text=TEXT))) == whole.audio


def test_streamed_text_is_spoken_sentence_by_sentence(kokoro: Any) -> None:
    d, port = kokoro
    pieces = ["Home Assist", "ant asks, and the dae", "mon answers. In the v", "oice you gave it."]
    events = exchange(port, SynthesizeStart(voice=SynthesizeVoice(name="allison")),
                      *(SynthesizeChunk(text=p) for p in pieces),
                      Synthesize(text=TEXT, voice=SynthesizeVoice(name="allison")),  # the legacy copy: not spoken again
                      SynthesizeStop(), until="synthesize-stopped")
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types[-2:] == ["audio-stop", "synthesize-stopped"]
    assert types.count("audio-start") == 1 and types.count("audio-stop") == 1
    with d.client() as client:
        first = client.synthesize("Home Assistant asks, and the daemon answers. ", voice="allison", format="pcm_s16le")
        second = client.synthesize("In the voice you gave it.", voice="allison", format="pcm_s16le")
    assert pcm(events) == first.audio + second.audio


def test_errors_are_error_events_and_the_connection_goes_on(kokoro: Any) -> None:
    d, port = kokoro

    async def run() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=120) as client:
            got = []
            for event in (Synthesize(text="Hello.", voice=SynthesizeVoice(name="nobody")),
                          Synthesize(text="x" * 2001, voice=SynthesizeVoice(name="allison")),
                          Synthesize(text="Still here.", voice=SynthesizeVoice(name="allison"))):
                await client.write_event(event.event())
                while True:
                    answer = await client.read_event()
                    assert answer is not None
                    got.append(answer)
                    if answer.type in ENDS:
                        break
            return got

    events = asyncio.run(run())
    errors = [e for e in events if e.type == "error"]
    assert [e.data["code"] for e in errors] == ["voice_not_found", "text_too_long"]
    assert "nobody" in errors[0].data["text"]
    assert events[-1].type == "audio-stop" and len(pcm(events)) > 10000  # the third was answered


def test_under_load_with_zeromq_clients_no_reply_is_mixed(tmp_path: Path, testdata_dir: Path) -> None:
    d, port = door(tmp_path, {"name": "tone"})
    with d.start():
        tones = tone_voices(d, testdata_dir / "voices", ("carlo_a", "june_b"))
        results = mixed_load(
            lambda voice, text: pcm(exchange(port, Synthesize(text=text, voice=SynthesizeVoice(name=voice)))),
            d.client, lambda z, voice, text: z.synthesize(text, voice=voice, format="pcm_s16le").audio,
            ("carlo_a", "june_b"))
        for voice, text, audio in results:  # each reply is its own text's length, in its own voice's tone
            assert len(audio) // 2 == int(0.05 * len(text) * 16000), (voice, text, len(audio))
            assert abs(tone_of(audio, 16000) - tones[voice]) < 5, (voice, text)


def test_settings_refuse_the_network_unless_allowed() -> None:
    def build(settings: dict) -> None:
        PluginHost(PluginsConfig(enabled=("wyoming",)), settings={"wyoming": settings}, entry_points=True)

    with pytest.raises(ConfigError, match=r"listen: tcp://0.0.0.0:10200 is not a loopback address.*allow_network"):
        build({"listen": "tcp://0.0.0.0:10200"})
    with pytest.raises(ConfigError, match=r"listen: expected tcp://host:port"):
        build({"listen": "unix:///tmp/x"})
    build({"listen": "tcp://0.0.0.0:10200", "allow_network": True})


def test_streamed_text_splits_after_complete_sentences() -> None:
    assert complete_sentences("One. Two? Thr") == ("One. Two? ", "Thr")
    assert complete_sentences("No end yet") == ("", "No end yet")
    assert complete_sentences('He said "stop." Then') == ('He said "stop." ', "Then")
    assert complete_sentences("Version 1.5 is out") == ("", "Version 1.5 is out")  # no space after the dot
