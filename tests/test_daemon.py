"""The real daemon as a subprocess, talked to over real ZeroMQ sockets with the real client.

One daemon is started for the module (loading the model is the slow part); every test uses
its own voice files so tests do not depend on each other's order.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pytest
import soundfile as sf
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voiced import cli
from voiced.store import LocalStore
from voiced.client import Client, ClientTimeout, RequestError, Unreachable
from voiced.fsutil import sha256_file
from voiced.protocol import ERROR_CODES
from voiced.testing import DaemonProcess, free_port

from fakes import FAKE_ENGINES



QUIETER = """
import numpy as np
from voiced.hooks import hookimpl

@hookimpl
def voiced_postprocess_audio(audio, request):
    # a plugin from a plugin folder: voices whose name starts with "quiet" are spoken at -12 dB
    if request["voice"].get("name", "").startswith("quiet"):
        return (audio * 0.25).astype(np.float32)
    return None
"""


def tone(**options: Any) -> dict[str, dict[str, Any]]:
    """Settings for a daemon on the tests' weightless engine (``tests/fake_engines``): for tests of
    the daemon's own workings (signals, housekeeping, the watch, plugin doors), where Kokoro would
    only add its 15 s of loading."""
    return {"engine": {"name": "tone", "options": options}, "plugins": {"paths": [FAKE_ENGINES]}}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, kokoro_models: Any) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("daemon")
    (root / "plugins").mkdir()
    (root / "plugins" / "quieter.py").write_text(QUIETER)
    plugins = {
        "plugins": {"enabled": ["journal"], "paths": [root / "plugins"]},
        "plugins.journal": {"file": root / "journal.jsonl"},
    }
    d = DaemonProcess(root, plugins)
    kokoro_models(d.cache_dir / "models")
    d.start()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def clips(testdata_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in (testdata_dir / "voices").iterdir()}


@pytest.fixture(scope="module")
def speaker(daemon: DaemonProcess, clips: dict[str, Path]) -> str:
    """A voice prepared once for the synthesis tests."""
    shutil.copyfile(clips["allison_a"], daemon.voices / "allison.wav")
    daemon.wait_ready("allison")
    return "allison"


def decode(data: bytes) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(data), dtype="float32")


# ---------------------------------------------------------------------------- basics


def test_ping_and_status(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        pong = client.ping()
        assert pong["protocol"] == 1 and pong["version"]
        status = client.status()
    for key in ("uptime_s", "version", "device", "model", "queue", "voices", "rss_bytes", "cache", "requests"):
        assert key in status, key
    assert status["device"] == "cpu"
    assert status["rss_bytes"] > 10 * 2**20
    assert set(status["voices"]) == {"pending", "preparing", "ready", "failed"}


def test_status_hit_rate_counts_voices_new_to_the_cache(daemon: DaemonProcess, speaker: str) -> None:
    """The daemon's cache started empty and had to prepare a voice: not every lookup was a hit."""
    with daemon.client() as client:
        rate = client.status()["cache"]["hit_rate"]
    assert rate is not None and 0.0 <= rate < 1.0


def test_ipc_endpoint(daemon: DaemonProcess) -> None:
    with Client(daemon.ipc, timeout_s=10) as client:
        assert client.ping()["protocol"] == 1


def test_plain_req_socket(daemon: DaemonProcess) -> None:
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(daemon.tcp)
    try:
        req.send(json.dumps({"op": "ping", "id": 7}).encode())
        assert req.poll(10000)
        header = json.loads(req.recv_multipart()[0])
        assert header == {"id": 7, "ok": True, "version": header["version"], "protocol": 1}
    finally:
        req.close(0)


# ---------------------------------------------------------------------------- the folder, through the daemon


def test_voice_lifecycle_through_the_daemon(daemon: DaemonProcess, clips: dict[str, Path]) -> None:
    target = daemon.voices / "life.wav"
    shutil.copyfile(clips["june_a"], target)
    first = daemon.wait_ready("life")
    assert first["sha256"] == sha256_file(clips["june_a"])
    assert first["stage"] in ("stock", "quick", "refined")

    # rename: ready again under the new name without preparing (same sha256, never "preparing")
    states: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        with daemon.client() as client:
            while not stop.is_set():
                for v in client.voices():
                    if v["name"] == "life-renamed":
                        states.append(v["state"])
                time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        os.rename(target, daemon.voices / "life-renamed.wav")
        renamed = daemon.wait_ready("life-renamed")
        daemon.wait_voice("life", lambda v: v is None)
    finally:
        stop.set()
        watcher.join()
    assert renamed["sha256"] == first["sha256"]
    assert "preparing" not in states, states

    # changed content: prepared again, new hash
    shutil.copyfile(clips["june_b"], daemon.voices / "life-renamed.wav")
    changed = daemon.wait_ready("life-renamed", sha256=sha256_file(clips["june_b"]), stage="refined")
    assert changed["sha256"] != first["sha256"]

    # deleted: gone from voices, and its cache entries evicted after the grace period.
    # A voice is ready before its results are on disk (they are stored right after): wait for
    # the last stage's to land, or the eviction checked below could precede a store.
    deadline = time.monotonic() + 30
    with LocalStore(daemon.cache_dir) as cache:
        while (not any(kind == "refined" for _, kind in cache.entries_for(changed["sha256"]))
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert any(kind == "refined" for _, kind in cache.entries_for(changed["sha256"]))
    (daemon.voices / "life-renamed.wav").unlink()
    daemon.wait_voice("life-renamed", lambda v: v is None)
    deadline = time.monotonic() + 30
    with LocalStore(daemon.cache_dir) as cache:
        while cache.entries_for(changed["sha256"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cache.entries_for(changed["sha256"]) == []


def test_embed_op(daemon: DaemonProcess, speaker: str, speaker_encoder: Any, clips: dict[str, Path]) -> None:
    with daemon.client() as client:
        reply = client.embed(speaker)
        assert reply["state"] == "ready" and len(reply["embedding"]) == 256
        with pytest.raises(RequestError) as info:
            client.embed("no-such-voice")
        assert info.value.code == "voice_not_found"
    ours = speaker_encoder.embed_file(clips["allison_a"])
    assert float(np.dot(ours, np.asarray(reply["embedding"]))) > 0.999


def test_failed_voice_is_reported(daemon: DaemonProcess) -> None:
    (daemon.voices / "broken.wav").write_bytes(os.urandom(3000))
    voice = daemon.wait_voice("broken", lambda v: v is not None and v["state"] == "failed")
    assert voice["error"]
    with daemon.client() as client, pytest.raises(RequestError) as info:
        client.synthesize("Hello.", voice="broken")
    assert info.value.code == "voice_failed"
    assert voice["error"] in info.value.message


def test_file_names_as_users_write_them(
    daemon: DaemonProcess, clips: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Accents as macOS writes them, wide characters, a terminal escape: listed safely, found as typed."""
    nfd = unicodedata.normalize("NFD", "Renée")
    shutil.copyfile(clips["june_a"], daemon.voices / f"{nfd}.wav")
    shutil.copyfile(clips["carlo_a"], daemon.voices / "声.wav")
    shutil.copyfile(clips["allison_b"], daemon.voices / "evil\x1b[2J.flac")
    for name in ("Renée", "声", "evil\x1b[2J"):
        daemon.wait_ready(name)
    capsys.readouterr()
    assert cli.main(["voices", "--endpoint", daemon.tcp]) == 0
    rows = {line.split("  ")[0].rstrip(): line for line in capsys.readouterr().out.splitlines()}
    assert "\x1b" not in "".join(rows) and "evil\\x1b[2J" in rows
    # the state column lines up: a wide character takes two terminal columns
    column = {name: rows[name].index("ready") for name in ("Renée", "evil\\x1b[2J")}
    assert column["Renée"] == column["evil\\x1b[2J"] == rows["声"].index("ready") + 1
    out = daemon.root / "renee.wav"
    assert cli.main(["say", "Hello.", "--voice", "Renée", "-o", str(out), "--endpoint", daemon.tcp]) == 0
    assert sf.info(out).frames > 0


# ---------------------------------------------------------------------------- synthesis


@pytest.mark.slow  # a second Kokoro daemon, in torch, to its last stage: over a minute; CI runs it
def test_torch_backend_serves_a_dropped_voice(tmp_path: Path, clips: dict[str, Path]) -> None:
    """``[engine] options = { backend = "torch" }``: the same daemon, the model in torch."""
    settings = {"engine": {"options": {"backend": "torch", "batch": 4}, "refine_budget_s": 0},
                "server": {"synthesis_threads": 4}}
    texts = ("Hi.", "The torch model speaks too.", "A much longer sentence, with a pause, to take more time.",
             "Four at once.")
    with DaemonProcess(tmp_path, settings).start() as daemon:
        shutil.copyfile(clips["june_a"], daemon.voices / "june.wav")
        # the last stage: a voice that moves on between the two measures below would speak differently
        daemon.wait_voice("june", lambda v: v is not None and v["state"] == "ready" and v["stage"] == "refined")
        with daemon.client() as client:
            reply = client.synthesize("The torch model speaks too.", voice="june")
            chunks = list(client.stream("One sentence. And another one.", voice="june"))
            alone = {t: client.synthesize(t, voice="june").header["duration_s"] for t in texts}
        together: dict[str, float] = {}

        def ask(text: str) -> None:  # four requests side by side: their sentences share model calls
            with daemon.client() as own:
                together[text] = own.synthesize(text, voice="june").header["duration_s"]

        askers = [threading.Thread(target=ask, args=(t,)) for t in texts]
        for t in askers:
            t.start()
        for t in askers:
            t.join(600)
        log = daemon.log_tail(200_000)
    # each reply is its own text's speech: as long as when asked alone (a token may round the other way)
    assert set(together) == set(texts)
    assert all(abs(together[t] - alone[t]) <= 0.1 for t in texts), (together, alone)
    audio, rate = decode(reply.audio)
    assert rate == 24000 and np.isfinite(audio).all() and np.abs(audio).max() > 0.05
    assert 1.0 < len(audio) / rate < 4.0
    assert len([c for c in chunks if c.audio]) == 2 and chunks[-1].header["final"]  # a chunk per sentence
    assert "kokoro (torch) loaded on cpu" in log
    assert list((tmp_path / "cache").rglob("*.safetensors")), "the torch weights were not cached"


def test_synthesize_wav(daemon: DaemonProcess, speaker: str) -> None:
    with daemon.client() as client:
        short = client.synthesize("Hello there.", voice=speaker)
        long = client.synthesize("Hello there. This sentence is a good deal longer than the first one.", voice=speaker)
    audio, rate = decode(short.audio)
    assert rate == short.header["sample_rate"] == 24000
    assert short.header["voice"]["name"] == speaker and short.header["voice"]["sha256"]
    assert short.header["voice"]["stage"] in ("stock", "quick", "refined")
    assert abs(len(audio) / rate - short.header["duration_s"]) < 0.01
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0.05
    assert short.header["engine_s"] > 0
    long_audio, _ = decode(long.audio)
    assert len(long_audio) > 2 * len(audio)


def test_say_command_writes_a_whole_file_or_none(
    daemon: DaemonProcess, speaker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def say(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(["say", *argv, "--endpoint", daemon.tcp])
        return code, capsys.readouterr().err

    out = tmp_path / "hello.flac"
    code, err = say("Hello there.", "--voice", speaker, "-o", str(out))
    assert code == 0 and f"{out}: " in err and "of flac at 24000 Hz" in err
    assert sf.info(out).format == "FLAC" and sf.info(out).frames > 0
    failures = {
        ("Hello.", "--voice", "nobody", "-o", str(tmp_path / "a.wav")): "voice_not_found",
        ("", "--voice", speaker, "-o", str(tmp_path / "b.wav")): "bad_request",
        ("Hello.", "--voice", speaker, "-o", str(tmp_path)): "is a folder",
        ("Hello.", "--voice", speaker, "-o", str(tmp_path / "missing" / "c.wav")): "cannot write",
    }
    for argv, expected in failures.items():
        code, err = say(*argv)
        assert code == 1 and expected in err and len(err.splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello.flac"]  # no half files left behind


def test_say_to_a_player_that_quits_early(daemon: DaemonProcess, speaker: str) -> None:
    """``voiced say -o - | head -c 100``: the reader closes the pipe; no traceback."""
    text = "One sentence goes first. Then another follows it. And a third one closes the text."
    proc = subprocess.Popen(
        [sys.executable, "-m", "voiced", "say", text, "--voice", speaker, "--stream", "--format", "pcm_s16le",
         "-o", "-", "--endpoint", daemon.tcp],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize("fmt", ["flac", "ogg", "opus", "mp3", "pcm_s16le", "pcm_f32le"])
def test_formats_and_resampling(daemon: DaemonProcess, speaker: str, fmt: str) -> None:
    with daemon.client() as client:
        reply = client.synthesize("Formats.", voice=speaker, format=fmt, sample_rate=16000)
    assert reply.header["format"] == fmt and reply.header["sample_rate"] == 16000
    if fmt == "pcm_s16le":
        n = len(reply.audio) // 2
    elif fmt == "pcm_f32le":
        n = len(reply.audio) // 4
        assert np.isfinite(np.frombuffer(reply.audio, "<f4")).all()
    else:
        audio, rate = decode(reply.audio)
        assert rate == 16000
        n = len(audio)
    assert abs(n / 16000 - reply.header["duration_s"]) < 0.1


def test_streaming_sends_a_chunk_per_sentence(daemon: DaemonProcess, speaker: str) -> None:
    text = "The first sentence is here. A second one follows it. And a third ends the text."
    with daemon.client() as client:
        chunks = list(client.stream(text, voice=speaker, format="pcm_s16le"))
        whole = client.synthesize(text, voice=speaker, format="pcm_s16le")
    assert [c.header["seq"] for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].header["final"] is True and all(not c.header["final"] for c in chunks[:-1])
    assert len(chunks) >= 3  # at least one chunk per sentence before the final message
    streamed = b"".join(c.audio for c in chunks)
    assert len(streamed) == len(whole.audio)


def test_same_request_same_audio(daemon: DaemonProcess, speaker: str) -> None:
    with daemon.client() as client:
        a = client.synthesize("Repeatable output.", voice=speaker, format="pcm_f32le", params={"seed": 3})
        b = client.synthesize("Repeatable output.", voice=speaker, format="pcm_f32le", params={"seed": 3})
    if a.header["voice"]["stage"] == b.header["voice"]["stage"]:
        assert a.audio == b.audio


def test_voice_not_ready_and_wait(daemon: DaemonProcess, clips: dict[str, Path]) -> None:
    shutil.copyfile(clips["carlo_a"], daemon.voices / "late.wav")
    with daemon.client() as client:
        try:
            client.synthesize("Too early.", voice="late")
        except RequestError as exc:
            # not seen yet (the copy is still settling), or seen and being prepared
            assert exc.code in ("voice_not_found", "voice_not_ready"), exc
            if exc.code == "voice_not_ready":
                assert exc.header["error"]["state"] in ("pending", "preparing")
        reply = client.synthesize("Worth the wait.", voice="late", wait_s=90)
    assert reply.header["voice"]["name"] == "late"
    assert len(reply.audio) > 1000


# ---------------------------------------------------------------------------- concurrency and limits


def test_many_clients_each_get_their_own_answer(daemon: DaemonProcess, speaker: str) -> None:
    errors: list[str] = []

    def client_thread(n: int) -> None:
        try:
            with daemon.client() as client:
                for i in range(10):
                    op = i % 5 if i % 5 < 4 else 1  # one synthesis in five requests
                    if op == 0:
                        words = " ".join(["word"] * (1 + (n + i) % 5))
                        reply = client.synthesize(f"{words}.", voice=speaker, format="pcm_s16le")
                        assert reply.header["voice"]["name"] == speaker
                        assert len(reply.audio) > 0
                    elif op == 1:
                        assert client.ping()["protocol"] == 1
                    elif op == 2:
                        assert any(v["name"] == speaker for v in client.voices())
                    else:
                        assert "uptime_s" in client.status()
        except RequestError as exc:
            if exc.code != "busy":
                errors.append(f"client {n}: {exc}")
        except Exception as exc:  # collected and reported below
            errors.append(f"client {n}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors


def test_replies_match_request_ids_on_one_socket(daemon: DaemonProcess, speaker: str) -> None:
    """Several requests in flight on one DEALER: each reply carries its own request's id."""
    with daemon.client() as client:
        texts = {client.send("synthesize", text=f"Number {i}.", voice=speaker, format="pcm_s16le"): i for i in range(5)}
        pings = [client.send("ping") for _ in range(5)]
        for request_id in pings:
            assert client.receive(request_id).header["id"] == request_id
        lengths = {texts[rid]: len(client.receive(rid).audio) for rid in texts}
    assert len(lengths) == 5 and all(n > 0 for n in lengths.values())


def test_ping_is_answered_while_a_long_synthesis_runs(daemon: DaemonProcess, speaker: str) -> None:
    text = " ".join(f"This is sentence number {i} of a long paragraph." for i in range(8))
    with daemon.client() as slow, daemon.client() as fast:
        request_id = slow.send("synthesize", text=text, voice=speaker, format="pcm_s16le")
        time.sleep(0.2)  # let the worker start on it
        pong = fast.ping()
        status = fast.status()
        # the ping was answered while the synthesis was still running
        assert status["queue"] >= 1
        assert not slow._socket.poll(0), "the long synthesis finished before the ping: not a useful check"
        reply = slow.receive(request_id)
    assert pong["protocol"] == 1 and len(reply.audio) > 0


def test_queue_full_answers_busy_at_once(daemon: DaemonProcess, speaker: str) -> None:
    with daemon.client() as client:
        # queue_size is 8: a burst of 24 short requests overfills it before the worker catches up
        ids = [client.send("synthesize", text=f"Busy {i}.", voice=speaker, format="pcm_s16le") for i in range(24)]
        outcomes: dict[str, str] = {}
        for request_id in ids:
            try:
                client.receive(request_id)
                outcomes[request_id] = "ok"
            except RequestError as exc:
                outcomes[request_id] = exc.code
    assert "busy" in outcomes.values(), outcomes
    assert "ok" in outcomes.values(), outcomes
    assert set(outcomes.values()) <= {"ok", "busy"}


BAD_FRAMES: list[tuple[bytes, str]] = [
    (b"\xff\xfe not utf8", "bad_request"),
    (b"{not json", "bad_request"),
    (b"[1, 2, 3]", "bad_request"),
    (b'{"id": 1}', "bad_request"),
    (b'{"op": 5, "id": 1}', "bad_request"),
    (b'{"op": "dance", "id": 1}', "unknown_op"),
    (b'{"op": "synthesize", "id": 1, "voice": "x"}', "bad_request"),
    (b'{"op": "synthesize", "id": 1, "text": 5, "voice": "x"}', "bad_request"),
    (b'{"op": "synthesize", "id": 1, "text": "hi", "voice": "x", "format": "aiff"}', "bad_request"),
    (b'{"op": "synthesize", "id": 1, "text": "hi", "voice": "x", "stream": true, "format": "wav"}', "bad_request"),
    (b'{"op": "synthesize", "id": 1, "text": "hi", "voice": "nobody"}', "voice_not_found"),
    (b'{"op": "synthesize", "id": 1, "text": "' + b"a" * 2001 + b'", "voice": "x"}', "text_too_long"),
    (b'{"op": "ping", "id": 1, "extra": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}", "bad_request"),
    (b'{"op": "ping", "id": {"nested": true}}', "bad_request"),
    (b'{"op": "ping", "id": 1, "unexpected": 2}', "bad_request"),
    (b'{"op": "synthesize", "id": 1, "text": "hi", "voice": "x", "params": {"speed": NaN}}', "bad_request"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
def test_malformed_requests_get_the_right_error(daemon: DaemonProcess, frame: bytes, code: str) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.tcp)
    try:
        sock.send(frame)
        assert sock.poll(10000), "no reply: a malformed request must not be dropped silently"
        header = json.loads(sock.recv_multipart()[0])
    finally:
        sock.close(0)
    assert header["ok"] is False
    assert header["error"]["code"] == code, header
    assert header["error"]["message"]
    if frame.startswith(b'{"op"') and b'"id": 1' in frame:
        assert header["id"] == 1


def test_bad_params_and_text(daemon: DaemonProcess, speaker: str) -> None:
    with daemon.client() as client:
        for params in ({"speed": 9}, {"speed": "fast"}, {"seed": -1}):
            with pytest.raises(RequestError) as info:
                client.synthesize("Hello.", voice=speaker, params=params)
            assert info.value.code == "bad_request", params
        for text in ("", "   ", "?!...", "\x00\x01\x02"):
            with pytest.raises(RequestError) as info:
                client.synthesize(text, voice=speaker)
            assert info.value.code == "bad_request", repr(text)
        assert client.ping()["protocol"] == 1  # still serving


# Every JSON type, and the extremes of each, for any field a request carries. (NaN and Infinity
# make the frame invalid JSON; the rest reach the checks of each field.)
EXTREMES: tuple[Any, ...] = (
    None, True, False, 0, 1, -1, 3, 0.5, -0.0, 1e308, -1e308, 5e-324, 2**31, 2**63, -(2**63), 10**400, -(10**400),
    float("inf"), float("nan"), "", " ", "x", "\x00", "\ud83d\ude00", "\u202e", "a" * 5000, [], [1, "a"], {}, {"a": None}, [[[[]]]],
)
PARAM_NAMES = ("speed", "seed", "lang", "pitch", "")


def _exchange(sock: zmq.Socket, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Every header answering ``request`` (a stream's messages up to its final one)."""
    sock.send(json.dumps(request).encode())
    headers = []
    while True:
        assert sock.poll(120_000), f"no reply to {str(request)[:200]}"
        header = json.loads(sock.recv_multipart()[0])
        headers.append(header)
        if not header["ok"] or header.get("final", True):
            return headers


def _no_internal(sock: zmq.Socket, request: dict[str, Any]) -> None:
    for header in _exchange(sock, request):
        assert header.get("error", {}).get("code") != "internal", (str(request)[:300], header)
        if not header["ok"]:
            assert header["error"]["code"] in ERROR_CODES and header["error"]["message"]
            assert len(header["error"]["message"]) < 1000, header  # a huge value is not echoed whole


@pytest.fixture(scope="module")
def tone_daemon(tmp_path_factory: pytest.TempPathFactory, clips: dict[str, Path]) -> Iterator[DaemonProcess]:
    """A daemon on the weightless engine with one voice, "allison": for the request fuzz, which
    is about the daemon's checks (Kokoro's own parameters are fuzzed on the Kokoro daemon)."""
    d = DaemonProcess(tmp_path_factory.mktemp("tone-daemon"), tone()).start()
    shutil.copyfile(clips["allison_a"], d.voices / "allison.wav")
    d.wait_ready("allison")
    yield d
    assert d.stop() == 0


def _fuzz(daemon: DaemonProcess, requests: Iterable[dict[str, Any]], mixes: Any, examples: int) -> None:
    """Each of ``requests``, then ``examples`` requests drawn from ``mixes``, on one socket: none
    is answered ``internal``; the daemon still answers a ping afterwards."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.tcp)
    try:
        for request in requests:
            _no_internal(sock, request)

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(mixes)
        def mixed(request: dict[str, Any]) -> None:
            _no_internal(sock, request)

        mixed()
    finally:
        sock.close(0)
    with daemon.client() as client:
        assert client.ping()["protocol"] == 1


# a value hypothesis mixes in: the extremes and anything else of a JSON type
FUZZ_VALUE = st.one_of(st.sampled_from(EXTREMES), st.integers(), st.floats(), st.text(max_size=12))


def test_no_request_field_value_reaches_internal(tone_daemon: DaemonProcess) -> None:
    """Each field of each op set to every value of EXTREMES in a request that is otherwise valid:
    errors are the client's (bad_request...), never ``internal``; then hypothesis mixes them."""
    speaker = "allison"
    valid = {"op": "synthesize", "text": "Hi.", "voice": speaker, "format": "wav"}
    fields = ("op", "id", "text", "voice", "format", "stream", "params", "sample_rate", "wait_s", "extra")
    requests = [
        *({**valid, field: value} for field in fields for value in EXTREMES),
        *({"op": op, "voice": value} for op in ("embed", "ping", "voices", "status") for value in EXTREMES),
        *({**valid, "format": fmt, "sample_rate": rate} for fmt in ("mp3", "ogg", "opus", "flac", "wav", "pcm_s16le")
          for rate in (8000, 11025, 44100, 48000, 64000, 96000, 192000)),
    ]
    value = FUZZ_VALUE
    mixes = st.fixed_dictionaries(
        {"op": st.sampled_from(("synthesize", "synthesize", "embed"))},
        optional={
            "text": st.one_of(st.sampled_from(("Hi.", "One. Two.")), value),
            "voice": st.one_of(st.just(speaker), value),
            "format": st.one_of(st.sampled_from(("wav", "mp3", "ogg", "opus", "flac", "pcm_s16le", "pcm_f32le")), value),
            "stream": st.one_of(st.booleans(), value),
            "sample_rate": st.one_of(st.sampled_from((8000, 22050, 44100, 96000, 192000)), value),
            "wait_s": st.one_of(st.sampled_from((0, 0.5)), value),
        },
    )
    _fuzz(tone_daemon, requests, mixes, examples=100)


def test_no_engine_parameter_value_reaches_internal(daemon: DaemonProcess, speaker: str) -> None:
    """Kokoro's parameters, each set to every value of EXTREMES, then mixed with the request's
    other fields by hypothesis: the engine's refusals are the client's errors, never ``internal``."""
    valid = {"op": "synthesize", "text": "Hi.", "voice": speaker, "format": "wav"}
    requests = [{**valid, "params": {name: value}} for name in PARAM_NAMES for value in EXTREMES]
    mixes = st.fixed_dictionaries(
        {"op": st.just("synthesize"), "voice": st.just(speaker),
         "params": st.one_of(st.dictionaries(st.sampled_from(PARAM_NAMES), FUZZ_VALUE, max_size=3), FUZZ_VALUE)},
        optional={"text": st.sampled_from(("Hi.", "One. Two.")), "stream": st.booleans(),
                  "format": st.sampled_from(("wav", "pcm_f32le")), "sample_rate": st.sampled_from((8000, 48000))},
    )
    _fuzz(daemon, requests, mixes, examples=30)


def test_extra_frames_and_oversized_messages(daemon: DaemonProcess) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.tcp)
    try:
        sock.send_multipart([b'{"op": "ping", "id": 3}', b"extra"])
        assert sock.poll(10000)
        header = json.loads(sock.recv_multipart()[0])
        assert header["error"]["code"] == "bad_request" and header["id"] == 3
    finally:
        sock.close(0)
    # larger than max_message_bytes: the socket refuses it (the peer is disconnected), the daemon lives
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(daemon.tcp)
    big.send(b"x" * (2 << 20))
    time.sleep(0.5)
    big.close(0)
    with daemon.client() as client:
        assert client.ping()["protocol"] == 1
    # through the client: the daemon drops the connection, and the client says why at once (not
    # after its 60 s timeout)
    started = time.monotonic()
    with Client(daemon.tcp) as client, pytest.raises(Unreachable, match="closed the connection.*max_message_bytes"):
        client.synthesize("Hello. " * 200_000, voice="anyone")
    assert time.monotonic() - started < 30
    with daemon.client() as client:
        assert client.ping()["protocol"] == 1
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with Client(nobody, timeout_s=0.5) as client, pytest.raises(ClientTimeout) as info:
        client.synthesize("Hello.", voice="anyone")  # a small request has no such hint
    assert "max_message_bytes" not in str(info.value)


def test_client_commands_without_a_daemon_say_so_at_once(tmp_path: Path) -> None:
    """Nothing listens: one line naming the endpoint and 'voiced serve', long before the 60 s timeout."""
    stale = tmp_path / "stale.sock"  # a socket file left by a daemon that died: nothing listens
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(stale))
    endpoints = {
        f"tcp://127.0.0.1:{free_port()}": "connection refused",
        f"ipc://{tmp_path / 'missing.sock'}": "no such socket file",
        f"ipc://{stale}": "connection refused",
    }
    for endpoint, why in endpoints.items():
        for command in (["status"], ["voices", "--json"], ["say", "Hello.", "--voice", "anyone", "-o", str(tmp_path / "x.wav")]):
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "voiced", *command, "--endpoint", endpoint],
                                    capture_output=True, text=True, timeout=120)
            took = time.monotonic() - started
            assert result.returncode == 1 and result.stdout == "", (command, result)
            assert result.stderr == f"voiced: no daemon listens at {endpoint} ({why}); start one with 'voiced serve'\n"
            assert took < 30, f"{command} took {took:.1f}s: it waited for the timeout"
    assert not (tmp_path / "x.wav").exists()


# ---------------------------------------------------------------------------- signals


def test_sighup_reloads_and_sigterm_exits_cleanly(tmp_path: Path, clips: dict[str, Path]) -> None:
    d = DaemonProcess(tmp_path, tone(sentence_s=1.0)).start()  # a sentence takes 1 s: in flight at SIGTERM
    try:
        shutil.copyfile(clips["june_b"], d.voices / "june.wav")
        d.wait_ready("june")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reloaded" not in d.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reloaded" in d.log.read_text()
        with d.client() as client:
            assert client.ping()["protocol"] == 1
            request_id = client.send("synthesize", text="Finishing this before exit.", voice="june", format="wav")
            time.sleep(0.1)
            d.proc.send_signal(signal.SIGTERM)
            reply = client.receive(request_id)  # in flight when SIGTERM came: still answered
            assert len(reply.audio) > 1000
    finally:
        code = d.stop()
    assert code == 0
    assert "voiced stopped" in d.log.read_text()


def test_engine_housekeeping_runs_and_its_failure_is_logged_once(tmp_path: Path) -> None:
    calls = tmp_path / "idle-calls"  # the engine counts the daemon's calls, then fails like a broken one
    d = DaemonProcess(tmp_path, tone(idle_calls=calls)).start()
    try:
        deadline = time.monotonic() + 30
        while (not calls.exists() or len(calls.read_text()) < 3) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(calls.read_text()) >= 3  # once a second
        with d.client() as client:
            assert client.ping()["protocol"] == 1
    finally:
        code = d.stop()
    assert code == 0
    assert d.log.read_text().count("engine housekeeping failed: tone refuses to tidy up") == 1


# ---------------------------------------------------------------------------- plugins in the real daemon


def test_plugin_folder_and_first_party_plugin(daemon: DaemonProcess, speaker: str, clips: dict[str, Path]) -> None:
    shutil.copyfile(clips["allison_a"], daemon.voices / "quiet-allison.wav")
    daemon.wait_ready("quiet-allison")
    with daemon.client() as client:
        loud = client.synthesize("Plugins at work.", voice=speaker, format="pcm_f32le")
        quiet = client.synthesize("Plugins at work.", voice="quiet-allison", format="pcm_f32le")
        status = client.status()
    a = np.frombuffer(loud.audio, "<f4")
    b = np.frombuffer(quiet.audio, "<f4")
    if loud.header["voice"]["stage"] == quiet.header["voice"]["stage"]:
        assert len(a) == len(b)
        ratio = float(np.sqrt(np.mean(b**2)) / np.sqrt(np.mean(a**2)))
        assert abs(ratio - 0.25) < 0.01, ratio
    else:  # one of them was refined meanwhile: compare levels only
        assert np.abs(b).max() < 0.5 * np.abs(a).max()
    assert {"journal", "quieter"} <= {p["name"] for p in status["plugins"]["loaded"]}
    assert "quieter" in status["plugins"]["timings"]

    # the journal plugin wrote the lifecycle events as JSON lines
    lines = [json.loads(line) for line in (daemon.root / "journal.jsonl").read_text().splitlines()]
    ready = [e for e in lines if e["event"] == "ready" and e["name"] == "quiet-allison"]
    assert ready and ready[0]["sha256"] == sha256_file(clips["allison_a"])


def test_voices_watch_waits_for_a_file_still_being_written(tmp_path: Path, clips: dict[str, Path]) -> None:
    """A file half copied is a voice to come: status counts it as settling, and the watch goes on
    until it is complete and prepared, instead of ending with the voices it already has."""
    daemon = DaemonProcess(tmp_path, {**tone(), "voices": {"settle_s": 60.0}}).start()
    try:
        shutil.copyfile(clips["carlo_a"], daemon.voices / "carlo.wav")
        daemon.wait_voice("carlo", lambda v: v is not None and v["state"] == "ready")
        data = clips["allison_a"].read_bytes()
        with open(daemon.voices / "allison.wav", "wb") as partial:
            partial.write(data[: len(data) // 2])
            partial.flush()
            with Client(daemon.tcp) as client:
                deadline = time.monotonic() + 60
                while client.status()["settling"] != 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert client.status()["settling"] == 1
            watch = [sys.executable, "-m", "voiced", "voices", "--watch", "--interval", "0.2", "--endpoint", daemon.tcp]
            proc = subprocess.Popen(watch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith("1/1 done: 1 ready (") and first.endswith(", 1 arriving\n"), first
            time.sleep(1.0)
            assert proc.poll() is None, "the watch ended while a file was still arriving"
            partial.write(data[len(data) // 2:])
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (out, err)
        assert out.splitlines()[-1].startswith("2/2 done: 2 ready ("), out
    finally:
        assert daemon.stop() == 0


def test_voices_watch_follows_a_drop_until_all_are_done(tmp_path: Path, clips: dict[str, Path]) -> None:
    """voiced voices --watch in a pipe: a line per change, then it exits; 1 with the failed voice named."""
    daemon = DaemonProcess(tmp_path, tone()).start()
    try:
        watch = [sys.executable, "-m", "voiced", "voices", "--watch", "--interval", "0.2", "--endpoint", daemon.tcp]
        # the watch starts before the drop (on any machine), so it sees the voices arrive
        proc = subprocess.Popen(watch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        for stem in ("allison_a", "carlo_a", "june_a"):
            shutil.copyfile(clips[stem], daemon.voices / f"{stem.split('_')[0]}.wav")
        (daemon.voices / "broken.wav").write_bytes(os.urandom(3000))
        out, err = proc.communicate(timeout=600)
        lines = [first.rstrip("\n"), *out.splitlines()]
        assert proc.returncode == 1, (lines, err)
        assert lines[0] == "no voices yet", lines
        assert lines[-1].startswith("4/4 done: 3 ready (") and lines[-1].endswith("), 1 failed"), lines
        assert len(lines) >= 3 and len(lines) == len(set(lines))  # a line per change, not per look
        assert err == "voiced: 1 voice failed: broken ('voiced voices' says why)\n"
        (daemon.voices / "broken.wav").unlink()
        daemon.wait_voice("broken", lambda v: v is None)
        result = subprocess.run([*watch, "--json"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and result.stderr == "", result
        last = json.loads(result.stdout.splitlines()[-1])
        assert last["voices"] == 3 and last["states"] == {"ready": 3} and sum(last["stages"].values()) == 3
    finally:
        assert daemon.stop() == 0


SIDE_DOOR = """
import json
from pathlib import Path

from voiced.hooks import hookimpl
from voiced.protocol import Synthesize

OUT = Path(__file__).with_name("side-door")


class Answer:
    def chunk(self, header, data):
        raise AssertionError("not a stream")

    def done(self, header, data):
        (OUT / "reply.wav").write_bytes(data)
        (OUT / "header.json").write_text(json.dumps(header))

    def fail(self, code, message):
        (OUT / "error.txt").write_text(f"{code}: {message}")

    def refused(self, error):
        (OUT / "error.txt").write_text(f"{error.code}: {error.message}")


@hookimpl
def voiced_serve(service):
    OUT.mkdir(exist_ok=True)
    (OUT / "info.json").write_text(json.dumps({"sample_rate": service.sample_rate, "voices": service.voices()}))
    # a voice that is not there yet: the request waits for it, as a ZeroMQ one with wait_s would
    service.submit(Synthesize(text="Through the side door.", voice="allison", wait_s=300), Answer(), request_id="side")
"""


def test_a_plugin_opens_a_front_door_onto_the_daemon(tmp_path: Path, clips: dict[str, Path]) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "side_door.py").write_text(SIDE_DOOR)
    out = tmp_path / "plugins" / "side-door"
    d = DaemonProcess(tmp_path, {"engine": {"name": "tone"}, "plugins": {"paths": [tmp_path / "plugins", FAKE_ENGINES]}}).start()
    try:
        info = json.loads((out / "info.json").read_text())
        assert info == {"sample_rate": 16000, "voices": []}
        shutil.copyfile(clips["allison_a"], d.voices / "allison.wav")
        deadline = time.monotonic() + 300
        while not (out / "header.json").exists() and not (out / "error.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (out / "error.txt").exists(), (out / "error.txt").read_text()
        header = json.loads((out / "header.json").read_text())
        audio, rate = decode((out / "reply.wav").read_bytes())
        assert header["voice"]["name"] == "allison" and rate == header["sample_rate"] == 16000
        assert header["duration_s"] == pytest.approx(len(audio) / rate, abs=1e-3) and len(audio) > rate // 2
        with d.client() as client:
            assert client.status()["requests"]["served"] >= 1  # counted with the ZeroMQ door's
    finally:
        code = d.stop()
    assert code == 0
