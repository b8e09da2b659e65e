"""The speech pipeline without a socket: the real Kokoro engine, real plugins, real encoders."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from voiced.config import PluginsConfig
from voiced.engines.kokoro import KokoroEngine
from voiced.hooks import hookimpl
from voiced.hooks import PluginHost
from voiced.protocol import BAD_REQUEST, INTERNAL, Limits, ProtocolError, Synthesize, check_synthesize, parse_request
from voiced.speech import Speech, Utterance

VOICE = {"name": "alice", "sha256": "ab" * 32, "stage": "stock"}
TWO = "The river was calm. We walked along it until dark."


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, kokoro_models: Any) -> KokoroEngine:
    eng = KokoroEngine(kokoro_models(tmp_path_factory.mktemp("kokoro")), max_chars=20_000)
    eng.load("cpu")
    return eng


@pytest.fixture(scope="module")
def voice(engine: KokoroEngine) -> Any:
    return engine.default_conditioning()


def run(speech: Speech, request: Synthesize, conditioning: Any, **kw: Any) -> tuple[Utterance, list[Any]]:
    utterance = speech.utterance(request, VOICE, conditioning, request_id="r1", **kw)
    return utterance, list(utterance.pieces())


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768


class Recorder:
    """A plugin that marks the text, halves the audio and keeps what synthesis_done receives."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.done: list[tuple[dict[str, Any], np.ndarray, Mapping[str, Any]]] = []
        self.posts: list[tuple[int, bool]] = []

    @hookimpl
    def voiced_preprocess_text(self, text: str) -> str:
        self.texts.append(text)
        return text.replace("river", "lake")

    @hookimpl
    def voiced_postprocess_audio(self, audio: np.ndarray, request: dict[str, Any]) -> np.ndarray:
        self.posts.append((request["seq"], request["final"]))
        return audio * 0.5

    @hookimpl
    def voiced_synthesis_done(self, request: dict[str, Any], audio: np.ndarray, timings: Mapping[str, Any]) -> None:
        self.done.append((request, audio, timings))


def host(*plugins: tuple[str, Any]) -> PluginHost:
    return PluginHost(PluginsConfig(), settings={}, extra=list(plugins), entry_points=False)


def test_a_whole_reply_is_one_encoded_file(engine: KokoroEngine, voice: Any) -> None:
    utterance, pieces = run(Speech(engine), Synthesize(text=TWO, voice="alice"), voice)
    assert len(pieces) == 1 and pieces[0].final
    audio, rate = sf.read(io.BytesIO(pieces[0].data), dtype="float32")
    assert rate == engine.sample_rate == utterance.header["sample_rate"]
    assert 2.0 < len(audio) / rate < 8.0 and np.abs(audio).max() > 0.05
    assert utterance.duration_s == pytest.approx(len(audio) / rate, abs=1e-3)
    assert utterance.header["voice"] == {"name": "alice", "sha256": "ab" * 32, "stage": "stock"}
    assert utterance.engine_s > 0


def test_a_stream_sends_a_chunk_per_sentence_with_the_same_audio(engine: KokoroEngine, voice: Any) -> None:
    speech = Speech(engine)
    beats: list[int] = []
    streamed, pieces = run(speech, Synthesize(text=TWO, voice="alice", format="pcm_s16le", stream=True), voice,
                           on_chunk=lambda: beats.append(1))
    assert [(p.seq, p.final) for p in pieces] == [(0, False), (1, False), (2, True)]
    assert len(beats) == 2 and streamed.seq == 2
    _, whole = run(speech, Synthesize(text=TWO, voice="alice", format="pcm_s16le"), voice)
    joined = b"".join(p.data for p in pieces)
    assert joined == whole[0].data  # the same samples, whether streamed or not
    assert streamed.duration_s == pytest.approx(len(pcm16(joined)) / engine.sample_rate, abs=1e-3)


def test_resampling_and_formats(engine: KokoroEngine, voice: Any) -> None:
    utterance, pieces = run(Speech(engine), Synthesize(text="Hello there.", voice="alice", format="flac",
                                                       sample_rate=16000), voice)
    audio, rate = sf.read(io.BytesIO(pieces[-1].data), dtype="float32")
    assert rate == 16000 == utterance.header["sample_rate"] and len(audio) > 8000


def test_an_ogg_opus_stream_is_one_playable_file(engine: KokoroEngine, voice: Any) -> None:
    _, pieces = run(Speech(engine), Synthesize(text=TWO, voice="alice", format="opus", stream=True), voice)
    assert len(pieces) == 3 and all(p.data for p in pieces[:-1])  # pages leave as sentences are done
    joined = b"".join(p.data for p in pieces)
    assert joined[:4] == b"OggS" and b"OpusHead" in joined[:64]
    audio, rate = sf.read(io.BytesIO(joined), dtype="float32")
    assert rate == engine.sample_rate and 2.0 < len(audio) / rate < 8.0 and np.abs(audio).max() > 0.05
    with pytest.raises(ProtocolError, match="sample_rate for opus must be one of 8000, 12000, 16000, 24000, 48000"):
        check_synthesize(Synthesize(text="Hi.", voice="alice", format="opus", sample_rate=44100), Limits())


def test_plugins_see_the_text_shape_the_audio_and_hear_the_whole_reply(engine: KokoroEngine, voice: Any) -> None:
    plain, plain_pieces = run(Speech(engine), Synthesize(text=TWO, voice="alice", format="pcm_f32le"), voice)
    recorder = Recorder()
    speech = Speech(engine, host(("recorder", recorder)))
    utterance, pieces = run(speech, Synthesize(text=TWO, voice="alice", format="pcm_f32le"), voice)
    assert recorder.texts == [TWO]
    assert recorder.posts == [(0, True)]  # a whole reply is post-processed once, as one signal
    audio = np.frombuffer(pieces[-1].data, dtype="<f4")
    reference = np.frombuffer(plain_pieces[-1].data, dtype="<f4")
    # "lake" for "river": other words, not the plain reply halved
    assert not (len(audio) == len(reference) and np.allclose(audio, reference * 0.5, atol=1e-4))
    assert np.abs(audio).max() <= 0.5 * np.abs(reference).max() * 1.3
    assert recorder.done == []  # only once the reply is on its way
    utterance.finish({"queue_s": 0.0, "engine_s": utterance.engine_s, "total_s": 0.1, "duration_s": 1.0})
    (request, heard, timings), = recorder.done
    assert request["text"] == TWO and request["spoken_text"] == TWO.replace("river", "lake")
    assert request["id"] == "r1" and request["voice"]["name"] == "alice"
    assert np.allclose(heard, audio)  # what was sent, after post-processing
    assert timings["total_s"] == 0.1


def test_a_stream_is_post_processed_chunk_by_chunk_and_ends_with_a_tail(engine: KokoroEngine, voice: Any) -> None:
    recorder = Recorder()
    speech = Speech(engine, host(("recorder", recorder)))
    utterance, pieces = run(speech, Synthesize(text=TWO, voice="alice", format="pcm_s16le", stream=True), voice)
    assert recorder.posts == [(0, False), (1, False), (2, True)]
    utterance.finish({})
    (request, heard, _), = recorder.done
    assert request["final"] and len(heard) == len(pcm16(b"".join(p.data for p in pieces)))


class Boom:
    @hookimpl
    def voiced_postprocess_audio(self, audio: np.ndarray) -> np.ndarray:
        raise RuntimeError("the filter broke")


class Failing:
    """The real engine, failing after its first chunk as a broken GPU would."""

    def __init__(self, engine: KokoroEngine) -> None:
        self.engine = engine
        self.sample_rate = engine.sample_rate

    def synthesize(self, text: str, conditioning: Any, params: Mapping[str, Any]) -> Iterator[np.ndarray]:
        chunks = self.engine.synthesize(text, conditioning, params)
        yield next(chunks)
        raise RuntimeError("device lost")


@pytest.mark.parametrize("case", ["plugin", "params", "engine", "text"])
def test_failures_carry_the_code_the_client_sees(engine: KokoroEngine, voice: Any, case: str) -> None:
    speech = {"plugin": Speech(engine, host(("boom", Boom()))), "engine": Speech(Failing(engine))}.get(case, Speech(engine))
    request = {
        "params": Synthesize(text=TWO, voice="alice", params={"speed": "fast"}),
        "text": Synthesize(text="   ", voice="alice"),
    }.get(case, Synthesize(text=TWO, voice="alice", format="pcm_s16le", stream=True))
    utterance = speech.utterance(request, VOICE, voice)
    sent = []
    with pytest.raises(ProtocolError) as caught:
        for piece in utterance.pieces():
            sent.append(piece)
    code = {"plugin": INTERNAL, "engine": INTERNAL}.get(case, BAD_REQUEST)
    assert caught.value.code == code, caught.value.message
    assert {"plugin": "boom", "engine": "device lost", "params": "speed"}.get(case, "") in caught.value.message
    assert len(sent) == (1 if case == "engine" else 0)  # a stream's first chunk went out before the failure


def test_the_wire_request_parses_to_the_typed_one() -> None:
    request = parse_request(b'{"op":"synthesize","id":7,"text":"Hi.","voice":"v","stream":true,'
                            b'"format":"ogg","wait_s":2,"params":{"speed":1.1}}', Limits())
    assert request.args == Synthesize(text="Hi.", voice="v", format="ogg", stream=True, params={"speed": 1.1},
                                      wait_s=2.0)
    assert parse_request(b'{"op":"embed","voice":"v"}', Limits()).args.voice == "v"
    assert parse_request(b'{"op":"ping"}', Limits()).args is None
