"""Synthesis engines: the common interface (base) and the built-in Kokoro engine."""

from __future__ import annotations

from voiced.engines.base import Conditioning, Engine, EngineError, ParamError, TextError

__all__ = ["Conditioning", "Engine", "EngineError", "ParamError", "TextError"]
