"""openai_http: the OpenAI audio API as a front door, for the many clients that speak it.

Open WebUI, SillyTavern, LibreChat, n8n and the official ``openai`` packages can send their
speech requests here. Each request takes the daemon's own path (the same queue, voices, limits
and post-processing hooks as a ZeroMQ request); this module only translates.

- ``POST /v1/audio/speech``: ``input``, ``voice`` (a voice's name, or ``{"id": name}``),
  ``model`` (any of ``models``), ``response_format`` (``mp3``, the default, ``opus``, ``flac``,
  ``wav``, ``pcm``: 16-bit little-endian mono at 24 kHz; ``aac`` has no encoder here and is
  refused), ``speed`` (0.25-4; the engine may allow less), ``stream_format`` (``audio`` or
  ``sse``), and ``lang`` (an espeak language code) beyond OpenAI's fields. ``pcm`` and ``opus``
  are streamed sentence by sentence; the other formats arrive whole.
- ``GET /v1/audio/voices``: the ready voices; ``GET /v1/models`` (and ``/v1/audio/models``):
  the model names accepted; ``GET /health``: no key needed.

Errors come in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``), with the
status an OpenAI client expects: 400 a bad request, 401 a missing or wrong key, 404 an unknown
voice or model, 429 a full queue (with ``Retry-After``), 503 a voice still being prepared after
``wait_s``, 500 a failure inside the daemon.

    [plugins]
    enabled = ["openai_http"]

    [plugins.openai_http]
    listen = "127.0.0.1:8880"
    # api_keys_file = "/etc/voiced/openai-keys"   # one bearer token per line; needed off loopback
    # voice_aliases = { alloy = "alice" }          # names clients insist on, mapped to voices

Without ``api_keys_file`` the door takes anyone who can reach it, so it only listens on a
loopback address (as the ZeroMQ side refuses a non-loopback tcp:// endpoint without CURVE).
The keys file is read again when it changes, so keys can be added or revoked while it runs.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from voiced.doors import AsyncReply, bind_tcp, require_voice, shown_address, split_listen
from voiced.errors import ConfigError
from voiced.hooks import PluginSettings, SynthesisService, hookimpl
from voiced.protocol import (
    BAD_REQUEST, BUSY, INTERNAL, MP3_RATES, OPUS_RATES, TEXT_TOO_LONG, UNAUTHORIZED, VOICE_FAILED,
    VOICE_NOT_FOUND, VOICE_NOT_READY, ProtocolError, Synthesize,
)
from voiced.security import is_loopback

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # far above any text the daemon accepts; a bigger body is refused unread
PCM_RATE = 24000  # OpenAI's pcm is 24 kHz, whatever the engine's rate

# response_format -> (the protocol's format, streamed, media type)
_FORMATS = {
    "mp3": ("mp3", False, "audio/mpeg"),
    "opus": ("opus", True, "audio/ogg"),
    "flac": ("flac", False, "audio/flac"),
    "wav": ("wav", False, "audio/wav"),
    "pcm": ("pcm_s16le", True, "audio/pcm"),
}
_UNAVAILABLE = {"aac": "no AAC encoder is installed here"}

# the daemon's error codes -> (HTTP status, OpenAI error type)
_STATUS = {
    BAD_REQUEST: (400, "invalid_request_error"),
    TEXT_TOO_LONG: (400, "invalid_request_error"),
    VOICE_NOT_FOUND: (404, "invalid_request_error"),
    VOICE_FAILED: (400, "invalid_request_error"),
    VOICE_NOT_READY: (503, "server_error"),
    BUSY: (429, "rate_limit_error"),
    UNAUTHORIZED: (401, "invalid_request_error"),
    INTERNAL: (500, "server_error"),
}


@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):
    listen: str = "127.0.0.1:8880"
    """host:port to serve HTTP on (``[::1]:8880`` for IPv6; port 0 picks a free one)."""
    api_keys_file: Path | None = None
    """A file of bearer tokens, one per line (``#`` comments); without it, loopback only."""
    models: tuple[str, ...] = ("voiced", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
    """Model names a request may give (clients send OpenAI's; they all mean this daemon)."""
    voice_aliases: Mapping[str, str] = field(default_factory=dict)
    """Voice names a client sends mapped to the voices' own (``alloy = "alice"``)."""
    wait_s: float = 30.0
    """How long a request waits for a voice that is still being prepared (an unknown one: not at all)."""

    def __post_init__(self) -> None:
        host, port = split_listen(self.listen)
        if self.api_keys_file is None and not is_loopback(f"tcp://{self.listen}"):
            raise ValueError(f"listen: {self.listen} is not a loopback address; set api_keys_file to serve "
                             f"the network (each client then needs a key), or listen on 127.0.0.1")
        if not self.models:
            raise ValueError("models: name at least one")
        if not 0 <= self.wait_s <= 3600:
            raise ValueError(f"wait_s: must be within 0..3600, got {self.wait_s}")


class ApiError(Exception):
    """A request answered with an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = dict(headers or {})

    @classmethod
    def from_protocol(cls, error: ProtocolError) -> ApiError:
        status, kind = _STATUS.get(error.code, (500, "server_error"))
        param = {VOICE_NOT_FOUND: "voice", VOICE_FAILED: "voice", TEXT_TOO_LONG: "input"}.get(error.code)
        retry = {BUSY: "1", VOICE_NOT_READY: "5"}.get(error.code)
        headers = {"Retry-After": retry} if retry else {}
        return cls(status, error.message, kind=kind, code=error.code, param=param, headers=headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SpeechRequest:
    """``POST /v1/audio/speech`` translated: the daemon's request and how to send its answer."""

    synthesize: Synthesize
    response_format: str
    media_type: str
    sse: bool


def parse_speech(body: Any, settings: Settings, engine_rate: int) -> SpeechRequest:
    """The request body (parsed JSON) -> :class:`SpeechRequest`; raises :class:`ApiError` (400/404)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or model not in settings.models):
        raise ApiError(404, f"the model {str(model)[:64]!r} does not exist here; use one of "
                       f"{', '.join(settings.models)}",
                       code="model_not_found", param="model")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "input must be a non-empty string", param="input")
    voice = body.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice:
        raise ApiError(400, "voice must be a voice's name (or {\"id\": name})", param="voice")
    voice = settings.voice_aliases.get(voice, voice)
    fmt = body.get("response_format", "mp3")
    if fmt in _UNAVAILABLE:
        raise ApiError(400, f"response_format {fmt} is not available: {_UNAVAILABLE[fmt]}; use one of "
                       f"{', '.join(_FORMATS)}", param="response_format")
    if not isinstance(fmt, str) or fmt not in _FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(_FORMATS)}, not {str(fmt)[:32]!r}",
                       param="response_format")
    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, "stream_format must be audio or sse", param="stream_format")
    params: dict[str, Any] = {}
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
        raise ApiError(400, f"speed must be a number within 0.25..4.0, got {str(speed)[:32]}", param="speed")
    if speed != 1.0:  # left out at 1.0: an engine without a speed control still answers
        params["speed"] = float(speed)
    lang = body.get("lang")
    if lang is not None:
        if not isinstance(lang, str):
            raise ApiError(400, "lang must be a language code such as en-us", param="lang")
        params["lang"] = lang
    wire, streamed, media_type = _FORMATS[fmt]
    rate = {"mp3": engine_rate if engine_rate in MP3_RATES else PCM_RATE,
            "opus": engine_rate if engine_rate in OPUS_RATES else 48000,
            "pcm": PCM_RATE}.get(fmt)
    request = Synthesize(text=text, voice=voice, format=wire, stream=streamed, params=params, sample_rate=rate,
                         wait_s=settings.wait_s)
    return SpeechRequest(request, fmt, "text/event-stream" if stream_format == "sse" else media_type,
                         stream_format == "sse")


class ApiKeys:
    """The bearer tokens of ``api_keys_file``, read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._keys: tuple[bytes, ...] = ()
        self._lock = threading.Lock()
        if not self._refresh():
            raise ConfigError(f"[plugins.openai_http] api_keys_file: cannot read {path}")
        if not self._keys:
            raise ConfigError(f"[plugins.openai_http] api_keys_file: {path} holds no key")

    def _refresh(self) -> bool:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return True
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("openai_http: cannot read %s (%s); the keys read before stay", self.path, exc)
            return False
        keys = tuple(line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#"))
        with self._lock:
            if self._stamp is not None and keys != self._keys:
                log.info("openai_http: %s changed: %d key(s)", self.path, len(keys))
            self._stamp, self._keys = stamp, keys
        return True

    def allows(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        self._refresh()
        given = token.strip().encode()
        # every key is compared, so the time taken says nothing about which one nearly matched
        return sum(hmac.compare_digest(given, key) for key in self._keys) > 0


# ---------------------------------------------------------------------- answers


class _CutShort(Exception):
    """Synthesis failed after the audio began: the response is broken off, so the client sees an
    incomplete body rather than a short one that looks whole."""


def _sse(event: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


# ---------------------------------------------------------------------- the door


class OpenAIDoor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = ApiKeys(Path(settings.api_keys_file)) if settings.api_keys_file is not None else None
        self.service: SynthesisService | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # lifecycle

    @hookimpl
    def voiced_serve(self, service: SynthesisService) -> None:
        self.service = service
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop chatter says what ours does
        sock = bind_tcp(*split_listen(self.settings.listen), "[plugins.openai_http] listen")
        address = shown_address(sock)
        config = uvicorn.Config(self.app(), log_config=None, access_log=False, lifespan="off", http="h11",
                                ws="none", server_header=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="openai-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self._server.should_exit = True
            sock.close()
            raise RuntimeError(f"the HTTP server did not start on {self.settings.listen}")
        log.info("openai_http: listening on http://%s%s", address, " (bearer keys)" if self.keys else "")

    @hookimpl
    def voiced_shutdown(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=15)
        if self._thread.is_alive():
            log.warning("openai_http: the HTTP server did not stop within 15 s")

    # the application

    def app(self) -> Starlette:
        async def not_found(request: Request, exc: HTTPException) -> Response:
            return self._error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        code="not_found" if exc.status_code == 404 else "method_not_allowed"))

        return Starlette(
            routes=[
                Route("/v1/audio/speech", self.speech, methods=["POST"]),
                Route("/v1/audio/voices", self.voices, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/audio/models", self.audio_models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: not_found},
        )

    def _error(self, error: ApiError) -> Response:
        if error.status >= 500:
            log.warning("openai_http: %d %s", error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def _check_key(self, request: Request) -> None:
        if self.keys is not None and not self.keys.allows(request.headers.get("authorization")):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise ApiError(400, "the body must be JSON (Content-Type: application/json)") from None

    async def speech(self, request: Request) -> Response:
        try:
            self._check_key(request)
            asked = parse_speech(await self._body(request), self.settings, self.service.sample_rate)
            answer = AsyncReply(asyncio.get_running_loop())
            request_id = uuid.uuid4().hex[:16]
            try:
                require_voice(self.service, asked.synthesize.voice)
                self.service.submit(asked.synthesize, answer, request_id=request_id)
            except ProtocolError as exc:
                raise ApiError.from_protocol(exc) from None
            first = await answer.next()
            if first[0] == "fail":  # nothing was sent yet: the error gets its own status
                answer.gone = True
                raise ApiError.from_protocol(first[1])
        except ApiError as exc:
            return self._error(exc)
        return self._respond(asked, answer, first, request_id)

    def _respond(self, asked: SpeechRequest, answer: AsyncReply, first: tuple[Any, ...], request_id: str) -> Response:
        header = first[1]
        headers = {"X-Request-Id": request_id, "X-Sample-Rate": str(header.get("sample_rate", "")),
                   "X-Voice": _ascii(str(header.get("voice", {}).get("name", ""))),
                   "X-Voice-Stage": str(header.get("voice", {}).get("stage", ""))}
        if first[0] == "done" and not asked.sse:
            return Response(first[2], media_type=asked.media_type, headers=headers)

        async def body() -> AsyncIterator[bytes]:
            item = first
            try:
                while True:
                    kind = item[0]
                    if kind == "fail":
                        log.warning("openai_http: request %s failed after its audio began: %s", request_id,
                                    item[1].message)
                        raise _CutShort(item[1].message)
                    data = item[2]
                    if asked.sse:
                        if data:
                            yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
                        if kind == "done":
                            yield _sse({"type": "speech.audio.done", "duration_s": item[1].get("duration_s")})
                    elif data:
                        yield data
                    if kind == "done":
                        return
                    item = await answer.next()
            finally:
                answer.gone = True

        return StreamingResponse(body(), media_type=asked.media_type, headers=headers)

    async def voices(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ApiError as exc:
            return self._error(exc)
        ready = [v for v in self.service.voices() if v.get("state") == "ready"]
        aliases: dict[str, list[str]] = {}
        for alias, name in self.settings.voice_aliases.items():
            aliases.setdefault(name, []).append(alias)
        return JSONResponse({"voices": [{"id": v["name"], "name": v["name"], "stage": v.get("stage"),
                                         "aliases": sorted(aliases.get(v["name"], []))} for v in ready]})

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "voiced"}

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ApiError as exc:
            return self._error(exc)
        return JSONResponse({"object": "list", "data": [self._model(m) for m in self.settings.models]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            self._check_key(request)
            if name not in self.settings.models:
                raise ApiError(404, f"the model {name[:64]!r} does not exist here", code="model_not_found")
        except ApiError as exc:
            return self._error(exc)
        return JSONResponse(self._model(name))

    async def audio_models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ApiError as exc:
            return self._error(exc)
        return JSONResponse({"models": [{"id": m, "name": m} for m in self.settings.models]})

    async def health(self, request: Request) -> Response:
        ready = sum(v.get("state") == "ready" for v in self.service.voices())
        return JSONResponse({"status": "ok", "voices_ready": ready, "sample_rate": self.service.sample_rate})


def _ascii(text: str) -> str:
    """A header value HTTP can carry (latin-1 only): other characters escaped."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def plugin(settings: Settings) -> OpenAIDoor:
    return OpenAIDoor(settings)
