"""Wire protocol v1: request parsing and validation, reply headers, error codes.

A request is one frame holding a UTF-8 JSON object: ``op``, an optional client-chosen ``id``
(echoed back) and the op's fields. A reply is a JSON header frame (always ``id`` and ``ok``;
on failure ``error: {code, message}``) followed by zero or more binary frames. Streaming
replies are several messages for one id, each with ``seq`` and ``final``.

Nothing here touches sockets, so the same code validates requests in the server and in tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Union

from voiced.errors import short_repr

PROTOCOL_VERSION = 1

BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
VOICE_NOT_FOUND = "voice_not_found"
VOICE_NOT_READY = "voice_not_ready"
VOICE_FAILED = "voice_failed"
TEXT_TOO_LONG = "text_too_long"
BUSY = "busy"
UNAUTHORIZED = "unauthorized"
INTERNAL = "internal"

ERROR_CODES = (
    BAD_REQUEST, UNKNOWN_OP, VOICE_NOT_FOUND, VOICE_NOT_READY, VOICE_FAILED,
    TEXT_TOO_LONG, BUSY, UNAUTHORIZED, INTERNAL,
)

FORMATS = ("wav", "flac", "ogg", "opus", "mp3", "pcm_s16le", "pcm_f32le")
# the sample rates MPEG-1, -2 and -2.5 layer III define: mp3 carries no other
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# Opus runs at these rates only (RFC 6716); an Ogg Opus stream may hold no other
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
STREAM_FORMATS = ("pcm_s16le", "pcm_f32le", "ogg", "opus")

MAX_ID_CHARS = 256


class ProtocolError(Exception):
    """A request that gets an error reply; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True)
class Limits:
    max_text_chars: int = 20000
    max_json_depth: int = 16


# op -> {field: (accepted types, required)}
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {},
    "voices": {},
    "status": {},
    "reload": {},
    "embed": {"voice": ((str,), True)},
    "synthesize": {
        "text": ((str,), True),
        "voice": ((str,), True),
        "format": ((str,), False),
        "stream": ((bool,), False),
        "params": ((dict,), False),
        "sample_rate": ((int,), False),
        "wait_s": ((int, float), False),
    },
}
OPS = tuple(_FIELDS)


@dataclass(frozen=True)
class Synthesize:
    """A validated ``synthesize`` request: what to say, in which voice, encoded how.

    Every front door builds one of these, so the speech pipeline sees one typed request
    whatever the transport."""

    text: str
    voice: str
    format: str = "wav"
    stream: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    sample_rate: int | None = None  # None: the engine's own rate
    wait_s: float = 0.0  # how long to wait for a voice that is not ready yet


@dataclass(frozen=True)
class Embed:
    """A validated ``embed`` request: the speaker embedding of one voice."""

    voice: str


class Reply(Protocol):
    """Where a synthesis job's answer goes: each front door has its own (ZeroMQ frames, an HTTP
    response, Wyoming events). Called from a synthesis thread, or from the leader for a request
    refused while it waited; never more than one of them at a time for one job."""

    def chunk(self, header: Mapping[str, Any], data: bytes) -> None:
        """A streamed piece: ``header`` has ``seq`` and what the audio is; ``data`` its bytes."""

    def done(self, header: Mapping[str, Any], data: bytes) -> None:
        """The reply's end: ``header`` adds ``duration_s`` and the timings; ``data`` the last bytes."""

    def fail(self, code: str, message: str) -> None:
        """Synthesis failed, perhaps after chunks were sent; ``code`` is a protocol error code."""

    def refused(self, error: ProtocolError) -> None:
        """The request was refused while it waited for its voice (timed out, the voice failed, busy)."""


# ping, voices, status and reload carry no fields
Args = Union[Synthesize, Embed, None]


@dataclass(frozen=True)
class Request:
    op: str
    id: Any
    args: Args = None


def peek_id(frame: bytes) -> Any:
    """The request's id where the frame is valid JSON with one, so even errors are matched."""
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict) and _valid_id(data.get("id")):
        return data.get("id")
    return None


def _valid_id(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return value is None
    if isinstance(value, int):
        return abs(value) < 2**63
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion limit), stopping past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_request(frame: bytes, limits: Limits) -> Request:
    """Validate one request frame; raises :class:`ProtocolError` with the right code."""
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(BAD_REQUEST, f"request is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, f"JSON nested deeper than {limits.max_json_depth} levels") from None
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, f"request is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, f"request must be a JSON object, got {_json_type(data)}")
    if _depth(data, limits.max_json_depth) > limits.max_json_depth:
        raise ProtocolError(BAD_REQUEST, f"JSON nested deeper than {limits.max_json_depth} levels")
    request_id = data.get("id")
    if not _valid_id(request_id):
        raise ProtocolError(BAD_REQUEST, f"id must be a string (up to {MAX_ID_CHARS} chars), an integer or null")
    op = data.get("op")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, "op is missing or not a string" if op is None else "op must be a string")
    if op not in _FIELDS:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op[:64]!r} (known: {', '.join(OPS)})")
    spec = _FIELDS[op]
    fields: dict[str, Any] = {}
    for name, value in data.items():
        if name in ("op", "id"):
            continue
        if name not in spec:
            raise ProtocolError(BAD_REQUEST, f"unknown field {name[:64]!r} for op {op}")
        types, _ = spec[name]
        if isinstance(value, bool) and bool not in types:
            raise ProtocolError(BAD_REQUEST, f"{name} must be {_names(types)}, got boolean")
        if not isinstance(value, types):
            raise ProtocolError(BAD_REQUEST, f"{name} must be {_names(types)}, got {_json_type(value)}")
        fields[name] = value
    for name, (_, required) in spec.items():
        if required and name not in fields:
            raise ProtocolError(BAD_REQUEST, f"{name} is required for op {op}")
    args: Args = None
    if op == "synthesize":
        args = check_synthesize(Synthesize(
            text=fields["text"], voice=fields["voice"], format=fields.get("format", "wav"),
            stream=bool(fields.get("stream")), params=fields.get("params") or {}, sample_rate=fields.get("sample_rate"),
            wait_s=fields.get("wait_s") or 0.0,
        ), limits)
    elif op == "embed":
        args = Embed(voice=fields["voice"])
    return Request(op=op, id=request_id, args=args)


def check_synthesize(request: Synthesize, limits: Limits) -> Synthesize:
    """``request`` if every value is within the daemon's limits (``wait_s`` as a float); raises
    :class:`ProtocolError` otherwise. Every front door checks its requests here."""
    text, fmt, rate, wait = request.text, request.format, request.sample_rate, request.wait_s
    if len(text) > limits.max_text_chars:
        raise ProtocolError(TEXT_TOO_LONG, f"text has {len(text)} characters; the limit is {limits.max_text_chars}")
    if fmt not in FORMATS:
        raise ProtocolError(BAD_REQUEST, f"format must be one of {', '.join(FORMATS)}, not {fmt[:32]!r}")
    if request.stream and fmt not in STREAM_FORMATS:
        raise ProtocolError(BAD_REQUEST, f"format {fmt} cannot stream; use one of {', '.join(STREAM_FORMATS)}")
    if rate is not None and not 8000 <= rate <= 192000:
        raise ProtocolError(BAD_REQUEST, f"sample_rate must be within 8000..192000, got {short_repr(rate)}")
    if rate is not None and fmt == "mp3" and rate not in MP3_RATES:
        raise ProtocolError(BAD_REQUEST, f"sample_rate for mp3 must be one of {', '.join(map(str, MP3_RATES))}, got {rate}")
    if rate is not None and fmt == "opus" and rate not in OPUS_RATES:
        raise ProtocolError(BAD_REQUEST, f"sample_rate for opus must be one of {', '.join(map(str, OPUS_RATES))}, got {rate}")
    if not (0 <= wait <= 3600 and math.isfinite(wait)):  # bounds first: a huge int overflows isfinite
        raise ProtocolError(BAD_REQUEST, f"wait_s must be within 0..3600, got {short_repr(wait)}")
    if not request.voice or len(request.voice) > 1024:
        raise ProtocolError(BAD_REQUEST, "voice must be a non-empty name of at most 1024 characters")
    return request if isinstance(wait, float) else dataclasses.replace(request, wait_s=float(wait))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _names(types: tuple[type, ...]) -> str:
    return " or ".join({str: "a string", bool: "a boolean", dict: "an object", int: "an integer", float: "a number"}[t] for t in types)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def encode(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def ok_reply(request_id: Any, **fields: Any) -> bytes:
    return encode({"id": request_id, "ok": True, **fields})


MAX_MESSAGE_CHARS = 500


def clip_message(message: str) -> str:
    """An error message of at most MAX_MESSAGE_CHARS: one that quotes a huge value the client
    sent (a 5000-character voice name as a seed) does not send it back whole."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS - 40]}... ({len(message)} characters)"


def error_reply(request_id: Any, code: str, message: str, **details: Any) -> bytes:
    error: dict[str, Any] = {"code": code, "message": clip_message(message)}
    error.update(details)
    return encode({"id": request_id, "ok": False, "error": error})
