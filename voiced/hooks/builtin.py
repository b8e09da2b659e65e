"""The built-in engines, registered through the same hook as any plugin's."""

from __future__ import annotations

from typing import Any

from voiced.hooks.specs import EngineContext, RegisterEngine, hookimpl


def kokoro_factory(context: EngineContext) -> Any:
    """Kokoro-82M (int8 ONNX), weights under ``<cache>/models``; ``[engine] options`` as keywords."""
    from voiced.engines.kokoro import KokoroEngine

    return KokoroEngine(context.models_dir, encoder=context.encoder, **dict(context.options))


@hookimpl
def voiced_register_engines(register: RegisterEngine) -> None:
    register("kokoro", kokoro_factory)
