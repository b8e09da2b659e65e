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
def test_fuzzed_frames_never_kill_the_daemon(endpoint: str) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    counts = {"frames": 0, "answered": 0}

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(frames)
    def one(frame: bytes) -> None:
        counts["frames"] += 1
        sock.send(frame)
        # a request of zero frames' worth (empty) still gets an answer; nothing may be dropped
        assert sock.poll(30000), f"no reply to {frame[:80]!r}"
        parts = sock.recv_multipart()
        counts["answered"] += 1
        check_reply(frame, parts)

    try:
        one()
    finally:
        sock.close(0)
    assert counts["frames"] >= min(CASES, 10000) * 0.95 and counts["answered"] == counts["frames"]
