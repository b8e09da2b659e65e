"""Plugins: the hooks a plugin implements (:mod:`.specs`), their settings (:mod:`.settings`),
where plugins come from (:mod:`.sources`) and the host that loads and calls them (:mod:`.host`).

A plugin imports what it needs from here::

    from voiced.hooks import PluginSettings, hookimpl

(``voiced.hookspecs`` and ``voiced.plugins``, where these names were first documented, still
export them.)
"""

from voiced.hooks.specs import (
    PROJECT, EngineContext, EngineFactory, RegisterEngine, SynthesisService, hookimpl, hookspec,
)
from voiced.hooks.settings import PluginSettings, build_settings
from voiced.hooks.sources import optional_names
from voiced.hooks.host import PluginError, PluginHost, new_request

__all__ = [
    "PROJECT",
    "EngineContext",
    "EngineFactory",
    "PluginError",
    "PluginHost",
    "PluginSettings",
    "RegisterEngine",
    "SynthesisService",
    "build_settings",
    "hookimpl",
    "hookspec",
    "new_request",
    "optional_names",
]
