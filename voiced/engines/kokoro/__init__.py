"""Kokoro-82M, the built-in engine (int8 ONNX on onnxruntime, espeak-ng front end)."""

from __future__ import annotations

from voiced.engines.kokoro.engine import MAX_TOKENS, SAMPLE_RATE, KokoroEngine

__all__ = ["KokoroEngine", "MAX_TOKENS", "SAMPLE_RATE"]
