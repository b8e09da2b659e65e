"""Where the plugin host and ``PluginSettings`` were first documented; plugins written against
it go on importing from here. The host lives in :mod:`voiced.hooks`, and nothing in voiced
imports this module."""

from voiced.hooks import PluginError, PluginHost, PluginSettings, build_settings, new_request

__all__ = ["PluginError", "PluginHost", "PluginSettings", "build_settings", "new_request"]
