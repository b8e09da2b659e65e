"""Another front door into a running server: Server.submit, beside ZeroMQ clients on a real socket."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fakes import Shelf

from voiced.client import Client, RequestError
from voiced.config import ServerConfig
from voiced.engines.kokoro import KokoroEngine
from voiced.protocol import BUSY, TEXT_TOO_LONG, VOICE_FAILED, VOICE_NOT_FOUND, VOICE_NOT_READY, ProtocolError, Synthesize
from voiced.server import Server
from voiced.speech import Speech
from voiced.testing import free_port


class Collected:
    """A front door's reply: what arrived, and on which thread."""

    def __init__(self) -> None:
        self.chunks: list[tuple[Mapping[str, Any], bytes]] = []
        self.final: tuple[Mapping[str, Any], bytes] | None = None
        self.error: tuple[str, str] | None = None
        self.threads: set[str] = set()
        self.finished = threading.Event()

    def chunk(self, header: Mapping[str, Any], data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        self.chunks.append((dict(header), data))

    def done(self, header: Mapping[str, Any], data: bytes) -> None:
        self.final = (dict(header), data)
        self.finished.set()

    def fail(self, code: str, message: str) -> None:
        self.error = (code, message)
        self.finished.set()

    def refused(self, error: ProtocolError) -> None:
        self.error = (error.code, error.message)
        self.finished.set()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, kokoro_models: Any) -> Iterator[Server]:
    engine = KokoroEngine(kokoro_models(tmp_path_factory.mktemp("kokoro")), max_chars=20_000)
    engine.load("cpu")
    config = ServerConfig(endpoints=(f"tcp://127.0.0.1:{free_port()}",), queue_size=4, max_text_chars=500)
    server = Server(config, Shelf(engine.default_conditioning(), alice="ready", bob="preparing", carol="failed"), Speech(engine))
    server.start()
    yield server
    server.stop()


def test_a_submitted_request_is_spoken_like_a_zeromq_one(server: Server) -> None:
    reply = Collected()
    server.submit(Synthesize(text="Hello from the other door.", voice="alice"), reply, request_id="d1")
    assert reply.finished.wait(60) and reply.error is None and reply.final is not None
    header, data = reply.final
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == header["sample_rate"] == 24000 and header["voice"]["name"] == "alice"
    assert header["duration_s"] == pytest.approx(len(audio) / rate, abs=1e-3) and np.abs(audio).max() > 0.05
    assert {"engine_s", "queue_s", "total_s"} <= set(header)
    with Client(server.endpoints[0], timeout_s=60) as client:
        same = client.synthesize("Hello from the other door.", voice="alice")
    assert same.audio == data  # one pipeline, whichever door


def test_a_submitted_stream_and_zeromq_clients_at_once_never_mix(server: Server) -> None:
    stream = Collected()
    texts = [f"Client number {n} is speaking now." for n in range(3)]
    answers: dict[int, bytes] = {}

    def ask(n: int) -> None:
        with Client(server.endpoints[0], timeout_s=120) as client:
            answers[n] = client.synthesize(texts[n], voice="alice", format="pcm_s16le", wait_s=5).audio

    server.submit(Synthesize(text="First sentence. Second sentence.", voice="alice", format="pcm_s16le",
                             stream=True), stream)
    clients = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(180)
    assert stream.finished.wait(120) and stream.error is None
    assert [h["seq"] for h, _ in stream.chunks] == [0, 1] and stream.final[0]["seq"] == 2
    assert all(t.startswith("voiced-server-") for t in stream.threads)
    assert sorted(answers) == [0, 1, 2]
    with Client(server.endpoints[0], timeout_s=60) as client:  # each client got its own text's audio
        for n in range(3):
            assert client.synthesize(texts[n], voice="alice", format="pcm_s16le").audio == answers[n]


def test_refusals_come_at_once_or_to_the_reply(server: Server) -> None:
    for request, code in [
        (Synthesize(text="x" * 501, voice="alice"), TEXT_TOO_LONG),
        (Synthesize(text="Hi.", voice="nobody"), VOICE_NOT_FOUND),
        (Synthesize(text="Hi.", voice="carol"), VOICE_FAILED),
        (Synthesize(text="Hi.", voice="bob"), VOICE_NOT_READY),
    ]:
        with pytest.raises(ProtocolError) as caught:
            server.submit(request, Collected())
        assert caught.value.code == code
    waited = Collected()
    server.submit(Synthesize(text="Hi.", voice="bob", wait_s=0.3), waited)  # waits, then times out
    assert waited.finished.wait(10) and waited.error is not None and waited.error[0] == VOICE_NOT_READY


def test_a_full_queue_is_busy_for_every_door(server: Server) -> None:
    long_text = " ".join(["This sentence keeps the model busy for a while."] * 3)
    replies = [Collected() for _ in range(5)]
    # one runs (long enough for the refusals below), four short ones wait: the queue holds four
    for reply, text in zip(replies, [long_text] + ["Hi."] * 4):
        server.submit(Synthesize(text=text, voice="alice", format="pcm_s16le"), reply)
    with pytest.raises(ProtocolError) as caught:
        server.submit(Synthesize(text="One more.", voice="alice"), Collected())
    assert caught.value.code == BUSY
    with Client(server.endpoints[0], timeout_s=10) as client:
        with pytest.raises(RequestError) as refused:
            client.synthesize("And one more.", voice="alice")
    assert refused.value.code == BUSY
    for reply in replies:
        assert reply.finished.wait(300) and reply.error is None
