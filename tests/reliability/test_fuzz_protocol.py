"""Hostile protocol input against a live daemon: property-based fuzzing of request frames.

The daemon must never die, and every request that is valid JSON must get a well-formed error
(or a correct answer): one JSON header with ``id`` and ``ok``, and on failure an error whose
code is one of the protocol's codes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voiced.protocol import ERROR_CODES
from voiced.testing import DaemonProcess

CASES = int(os.environ.get("VOICED_FUZZ_CASES", "10000"))
OPS = ["ping", "voices", "status", "embed", "reload", "synthesize", "dance", "", "PING"]
FIELDS = ["text", "voice", "format", "stream", "params", "sample_rate", "wait_s", "extra"]

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=30,
)
request_object = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(OPS), json_value)},
    optional={name: json_value for name in FIELDS} | {"id": st.one_of(st.integers(-5, 5), st.text(max_size=10))},
)


def _deep(depth: int) -> bytes:
    return b'{"op": "ping", "x": ' + b"[" * depth + b"]" * depth + b"}"


frames = st.one_of(
    request_object.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 5000).map(_deep),
    st.integers(0, 3).map(lambda n: b"{" * n + b'"op": "ping"' + b"}" * n),
    st.integers(100, 3000).map(lambda n: json.dumps({"op": "status", **{f"k{i}": [i] for i in range(n)}}).encode()),
    st.integers(1000, 60000).map(lambda n: json.dumps({"op": "synthesize", "voice": "x", "text": "a" * n}).encode()),
    st.sampled_from([b"", b"null", b"[]", b"{}", b'{"op": null}', b'{"op": "ping", "id": 1.5}', b"\xff" * 64]),
)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    daemon = DaemonProcess(
        tmp_path_factory.mktemp("fuzz"), {"server": {"max_message_bytes": 65536}, "log": {"level": "warning"}}
    ).start()
    yield daemon.tcp
    alive = daemon.alive
    log = daemon.log_tail()
    code = daemon.stop()
    assert alive, "the daemon died during fuzzing:\n" + log
    assert code == 0


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def check_reply(frame: bytes, parts: list[bytes]) -> None:
    if parts and parts[0] == b"":
        parts = parts[1:]  # an empty frame reads as a REQ envelope delimiter, and is echoed as one
    header: Any = json.loads(parts[0])
    assert isinstance(header, dict) and isinstance(header.get("ok"), bool) and "id" in header, header
    try:
        request = json.loads(frame)
    except (ValueError, RecursionError):
        request = None
    if isinstance(request, dict) and isinstance(request.get("id"), (str, int)) and not isinstance(request.get("id"), bool):
        assert header["id"] == request["id"], (header, request)  # a valid id is always echoed
    if not header["ok"]:
        assert header["error"]["code"] in ERROR_CODES, header
        assert isinstance(header["error"]["message"], str) and header["error"]["message"]


@pytest.mark.slow
def test_fuzzed_frames_never_kill_the_daemon(endpoint: str, report: Any) -> None:
    sock = dealer(endpoint)
    counts = {"frames": 0, "answered": 0}
    messages = st.one_of(frames.map(lambda f: [f]), st.lists(frames, min_size=2, max_size=3))

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(messages)
    def one(message: list[bytes]) -> None:
        counts["frames"] += 1
        sock.send_multipart(message)
        # every message gets an answer, even an empty frame; nothing may be dropped
        assert sock.poll(30000), f"no reply to {message[0][:80]!r} ({len(message)} frames)"
        parts = sock.recv_multipart()
        counts["answered"] += 1
        if len(message) == 1:
            check_reply(message[0], parts)
        else:
            check_reply(b"", parts)  # extra frames: an error reply, whatever the first frame was
            if parts[0] != b"":
                assert json.loads(parts[0])["ok"] is False

    try:
        one()
    finally:
        sock.close(0)
    row = report.row("hostile protocol input")
    row.tried += counts["frames"]
    row.held += counts["answered"]
    row.notes.append("hypothesis-generated messages, each answered with a well-formed reply")
    assert counts["frames"] >= min(CASES, 10000) * 0.95 and counts["answered"] == counts["frames"]


@pytest.mark.slow
def test_oversized_frames_disconnect_the_sender_only(endpoint: str, report: Any) -> None:
    """Frames over max_message_bytes: the socket drops that peer; others are served throughout."""
    bystander = dealer(endpoint)
    sizes = [65537, 100_000, 1 << 20, 8 << 20, 32 << 20]
    try:
        for size in sizes:
            big = dealer(endpoint)
            big.send(b"{" + b" " * (size - 2) + b"}")
            assert not big.poll(500), "an oversized frame must not be read, let alone answered"
            big.close(0)
            bystander.send(b'{"op": "ping", "id": "after"}')
            assert bystander.poll(10000)
            assert json.loads(bystander.recv_multipart()[0])["id"] == "after"
    finally:
        bystander.close(0)
    row = report.row("hostile protocol input")
    row.tried += len(sizes)
    row.held += len(sizes)
    row.notes.append("frames of 64 KiB+1 to 32 MiB dropped at the socket")
