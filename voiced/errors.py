"""Exception types shared across the package (the bottom of the import graph)."""

from __future__ import annotations

from typing import Any


class VoicedError(Exception):
    """Base class for errors the daemon reports to users as one clear line."""


class ConfigError(VoicedError):
    """A configuration file or value is invalid."""


class AudioError(VoicedError):
    """A reference recording cannot be used; the message says why, for the voice's `error`."""


class CacheError(VoicedError):
    """The on-disk cache cannot be read or written."""


def short_repr(value: Any) -> str:
    """repr(value) for an error message, shortened where a client sent something huge (a
    400-digit number): 20 characters and the length."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
