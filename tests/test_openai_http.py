"""The OpenAI-compatible HTTP door (plugins/openai_http.py), driven by the official ``openai``
client against the real daemon: Kokoro for the audio, the weightless tone engine where the test
is about keys, load and mixing."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fakes import FAKE_ENGINES, mixed_load, tone_of, tone_voices

from voiced.config import PluginsConfig
from voiced.errors import ConfigError
from voiced.hooks import PluginHost
from voiced.protocol import BUSY, VOICE_NOT_READY, ProtocolError
from voiced.testing import DaemonProcess, free_port

openai = pytest.importorskip("openai")

from plugins.openai_http import ApiError, ApiKeys, Settings, parse_speech  # noqa: E402

TEXT = "The other door opens onto the same voice. It speaks two sentences."


def http(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP request (no client library in between): status, headers, body."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def door(tmp_path: Path, engine: dict[str, Any], **door_settings: Any) -> tuple[DaemonProcess, str]:
    port = free_port()
    settings = {
        "engine": engine,
        "plugins": {"enabled": ["openai_http"], "paths": [FAKE_ENGINES]},
        "plugins.openai_http": {"listen": f"127.0.0.1:{port}", **door_settings},
    }
    return DaemonProcess(tmp_path, settings), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def kokoro(tmp_path_factory: pytest.TempPathFactory, testdata_dir: Path, kokoro_models: Any) -> Any:
    d, url = door(tmp_path_factory.mktemp("openai-kokoro"), {"refine_budget_s": 0},
                  voice_aliases={"alloy": "allison"})
    kokoro_models(d.cache_dir / "models")
    d.start()
    try:
        shutil.copyfile(testdata_dir / "voices" / "allison_a.wav", d.voices / "allison.wav")
        d.wait_ready("allison", stage="refined")
        yield d, url
    finally:
        assert d.stop() == 0


def client(url: str, key: str = "none") -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


# ---------------------------------------------------------------------- the real daemon, Kokoro


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus"])
def test_speech_in_each_container_decodes(kokoro: Any, fmt: str) -> None:
    d, url = kokoro
    reply = client(url).audio.speech.create(model="tts-1", voice="allison", input=TEXT, response_format=fmt)
    audio, rate = sf.read(io.BytesIO(reply.content), dtype="float32")
    assert rate == 24000, rate
    assert 2.5 < len(audio) / rate < 9.0 and np.abs(audio).max() > 0.05
    assert reply.response.headers["x-voice"] == "allison" and reply.response.headers["x-voice-stage"] == "refined"


def test_pcm_is_streamed_and_is_the_zeromq_replys_audio(kokoro: Any) -> None:
    d, url = kokoro
    with client(url).audio.speech.with_streaming_response.create(
        model="voiced", voice="allison", input=TEXT, response_format="pcm"
    ) as reply:
        assert reply.headers["content-type"] == "audio/pcm" and reply.headers["transfer-encoding"] == "chunked"
        streamed = b"".join(reply.iter_bytes())
    with d.client() as zmq_client:
        whole = zmq_client.synthesize(TEXT, voice="allison", format="pcm_s16le", sample_rate=24000)
    assert streamed == whole.audio  # the same path: the same samples


def test_speed_alias_and_server_sent_events(kokoro: Any) -> None:
    d, url = kokoro
    normal = client(url).audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="pcm").content
    fast = client(url).audio.speech.create(model="tts-1", voice="allison", input=TEXT, response_format="pcm",
                                           speed=1.5).content
    assert 0.55 < len(fast) / len(normal) < 0.8, (len(fast), len(normal))
    status, headers, body = http(f"{url}/v1/audio/speech", {"input": TEXT, "voice": {"id": "allison"}, "model": "tts-1",
                                                             "response_format": "pcm", "stream_format": "sse"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in body.decode().split("\n\n") if line]
    assert [e["type"] for e in events[-1:]] == ["speech.audio.done"] and len(events) >= 3
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == normal


def test_errors_come_in_openais_shape_with_the_right_status(kokoro: Any) -> None:
    d, url = kokoro
    c = client(url)
    with pytest.raises(openai.NotFoundError) as info:
        c.audio.speech.create(model="tts-1", voice="nobody", input="Hello.")
    assert info.value.body["code"] == "voice_not_found" and info.value.body["param"] == "voice"
    with pytest.raises(openai.NotFoundError) as info:
        c.audio.speech.create(model="dall-e-3", voice="allison", input="Hello.")
    assert info.value.body["code"] == "model_not_found"
    for kwargs, fragment in [({"response_format": "aac"}, "aac is not available"),
                             ({"speed": 0.3}, "speed must be a number within 0.5..2.0"),
                             ({"speed": 9}, "speed must be a number within 0.25..4.0"),
                             ({"input": " "}, "input must be a non-empty string"),
                             ({"input": "x" * 2001}, "the limit is 2000")]:
        with pytest.raises(openai.BadRequestError) as info:
            c.audio.speech.create(**{"model": "tts-1", "voice": "allison", "input": "Hello.", **kwargs})
        assert fragment in info.value.body["message"], info.value.body
        assert info.value.body["type"] == "invalid_request_error"
    status, _, body = http(f"{url}/v1/audio/speech", b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    # a client announcing a huge body is answered before it sends it
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as raw:
        raw.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 104857600\r\n\r\n[[[[")
        answer = ""
        while not answer.endswith("}}"):
            part = raw.recv(65536).decode()
            if not part:
                break
            answer += part
    assert answer.startswith("HTTP/1.1 413") and "the body is over" in answer, answer
    status, _, body = http(f"{url}/v1/chat/completions", {"messages": []})
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    # after all that, the daemon still serves both doors
    still = c.audio.speech.create(model="tts-1", voice="allison", input="Still here.", response_format="wav")
    assert len(still.content) > 1000
    with d.client() as zmq_client:
        assert zmq_client.ping()["protocol"] == 1


def test_voices_models_and_health_follow_the_folder(kokoro: Any, testdata_dir: Path) -> None:
    d, url = kokoro
    assert [m.id for m in client(url).models.list()] == ["voiced", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    voices = json.loads(http(f"{url}/v1/audio/voices")[2])["voices"]
    assert voices == [{"id": "allison", "name": "allison", "stage": "refined", "aliases": ["alloy"]}]
    # a file dropped in now: a request for it waits while it is prepared, then it is listed
    shutil.copyfile(testdata_dir / "voices" / "june_a.wav", d.voices / "june.wav")
    d.wait_voice("june", lambda v: v is not None)  # seen: perhaps still being prepared
    reply = client(url).audio.speech.create(model="tts-1", voice="june", input="Just arrived.", response_format="wav")
    assert sf.info(io.BytesIO(reply.content)).duration > 0.5
    assert {v["id"] for v in json.loads(http(f"{url}/v1/audio/voices")[2])["voices"]} == {"allison", "june"}
    (d.voices / "june.wav").unlink()
    deadline = time.monotonic() + 30
    while "june" in http(f"{url}/v1/audio/voices")[2].decode() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [v["id"] for v in json.loads(http(f"{url}/v1/audio/voices")[2])["voices"]] == ["allison"]
    status, _, body = http(f"{url}/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "voices_ready": 1, "sample_rate": 24000}


# ---------------------------------------------------------------------- keys and load, tone engine


def samples(text: str) -> int:
    """What the tone engine says for ``text``, in samples at 24 kHz (it speaks at 16 kHz)."""
    return int(0.05 * len(text) * 16000) * 24000 // 16000


def test_keys_guard_a_door_and_are_read_again_when_changed(tmp_path: Path, testdata_dir: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nfirst-key\n")
    d, url = door(tmp_path, {"name": "tone"}, api_keys_file=str(keys))
    with d.start():
        shutil.copyfile(testdata_dir / "voices" / "carlo_a.wav", d.voices / "carlo.wav")
        d.wait_ready("carlo")
        with pytest.raises(openai.AuthenticationError) as info:
            client(url, "wrong-key").audio.speech.create(model="tts-1", voice="carlo", input="Hello.")
        assert info.value.body["code"] == "invalid_api_key"
        assert http(f"{url}/v1/audio/voices")[0] == 401
        assert http(f"{url}/health")[0] == 200  # probes need no key
        reply = client(url, "first-key").audio.speech.create(model="tts-1", voice="carlo", input="Hello.",
                                                              response_format="pcm")
        assert abs(len(reply.content) // 2 - samples("Hello.")) <= 2
        time.sleep(0.01)  # a new mtime even on coarse clocks
        keys.write_text("second-key\n")
        with pytest.raises(openai.AuthenticationError):
            client(url, "first-key").models.list()
        assert [m.id for m in client(url, "second-key").models.list()][0] == "voiced"


def test_both_doors_under_load_never_mix_replies(tmp_path: Path, testdata_dir: Path) -> None:
    d, url = door(tmp_path, {"name": "tone"})
    with d.start():
        tones = tone_voices(d, testdata_dir / "voices", ("carlo_a", "june_b"), sample_rate=24000)
        c = client(url)
        results = mixed_load(
            lambda voice, text: c.audio.speech.create(model="tts-1", voice=voice, input=text,
                                                      response_format="pcm").content,
            d.client,
            lambda z, voice, text: z.synthesize(text, voice=voice, format="pcm_s16le", sample_rate=24000).audio,
            ("carlo_a", "june_b"))
        for voice, text, pcm in results:  # each reply is its own text's length, in its own voice's tone
            assert abs(len(pcm) // 2 - samples(text)) <= 2, (voice, text, len(pcm))
            assert abs(tone_of(pcm, 24000) - tones[voice]) < 5, (voice, text)


def test_a_port_in_use_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        d = DaemonProcess(tmp_path, {"engine": {"name": "tone"},
                                     "plugins": {"enabled": ["openai_http"], "paths": [FAKE_ENGINES]},
                                     "plugins.openai_http": {"listen": f"127.0.0.1:{port}"}})
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(timeout=120) != 0
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in d.log.read_text(), d.log_tail()
    finally:
        taken.close()


# ---------------------------------------------------------------------- without a daemon


def test_settings_refuse_the_network_without_keys() -> None:
    def build(settings: dict) -> None:
        PluginHost(PluginsConfig(enabled=("openai_http",)), settings={"openai_http": settings}, entry_points=True)

    with pytest.raises(ConfigError, match=r"listen: 0.0.0.0:8880 is not a loopback address; set api_keys_file"):
        build({"listen": "0.0.0.0:8880"})
    with pytest.raises(ConfigError, match=r"listen: expected host:port"):
        build({"listen": "8880"})
    build({"listen": "[::1]:8880"})


def test_requests_translate_to_the_daemons() -> None:
    settings = Settings(voice_aliases={"alloy": "alice"})
    asked = parse_speech({"input": "Hi.", "voice": "alloy"}, settings, 24000)
    assert (asked.synthesize.voice, asked.synthesize.format, asked.synthesize.stream) == ("alice", "mp3", False)
    assert asked.media_type == "audio/mpeg" and asked.synthesize.params == {} and asked.synthesize.wait_s == 30.0
    pcm = parse_speech({"input": "Hi.", "voice": "v", "response_format": "pcm", "speed": 1.25, "lang": "fr-fr"},
                       settings, 22050)
    assert (pcm.synthesize.format, pcm.synthesize.stream, pcm.synthesize.sample_rate) == ("pcm_s16le", True, 24000)
    assert pcm.synthesize.params == {"speed": 1.25, "lang": "fr-fr"}
    opus = parse_speech({"input": "Hi.", "voice": "v", "response_format": "opus"}, settings, 22050)
    assert opus.synthesize.sample_rate == 48000  # an engine rate Opus has not: its own
    for body, param in [([], None), ({"voice": "v"}, "input"), ({"input": "Hi."}, "voice"),
                        ({"input": "Hi.", "voice": "v", "speed": True}, "speed"),
                        ({"input": "Hi.", "voice": "v", "stream_format": "ws"}, "stream_format"),
                        ({"input": "Hi.", "voice": "v", "response_format": "ogg"}, "response_format")]:
        with pytest.raises(ApiError) as info:
            parse_speech(body, settings, 24000)
        assert info.value.status == 400 and info.value.param == param, body
    busy = ApiError.from_protocol(ProtocolError(BUSY, "the queue is full"))
    assert (busy.status, busy.kind, busy.headers) == (429, "rate_limit_error", {"Retry-After": "1"})
    assert ApiError.from_protocol(ProtocolError(VOICE_NOT_READY, "later")).status == 503


def test_a_keys_file_without_keys_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="holds no key"):
        ApiKeys(tmp_path / "keys")
    with pytest.raises(ConfigError, match="cannot read"):
        ApiKeys(tmp_path / "absent")
    (tmp_path / "keys").write_text("k1\n k2 \n")
    keys = ApiKeys(tmp_path / "keys")
    assert keys.allows("Bearer k2") and keys.allows("bearer k1")
    assert not any(keys.allows(header) for header in ("Bearer k3", "k1", None, "Bearer ", "Basic k1"))
