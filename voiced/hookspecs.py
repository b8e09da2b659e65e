"""Where ``hookimpl`` and the hook specifications were first documented; plugins written
against it go on importing from here. The hooks live in :mod:`voiced.hooks.specs`, and nothing
in voiced imports this module."""

from voiced.hooks.specs import PROJECT, EngineContext, EngineFactory, RegisterEngine, hookimpl, hookspec

__all__ = ["PROJECT", "EngineContext", "EngineFactory", "RegisterEngine", "hookimpl", "hookspec"]
