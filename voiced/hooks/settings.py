"""A plugin's settings: the table ``[plugins.NAME]``, checked against its ``Settings`` dataclass."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voiced.config import coerce_value
from voiced.errors import ConfigError

ON_ERROR = ("fail", "skip")


@dataclass(frozen=True, kw_only=True)
class PluginSettings:
    """Settings every plugin has; a plugin's own ``Settings`` dataclass subclasses this.

    Fields are the keys of ``[plugins.NAME]``: typed (str, int, float, bool, Path, list as
    ``tuple[X, ...]``, table as ``Mapping[str, X]``, ``X | None``), with defaults unless
    required. ``__post_init__`` may raise ValueError("key: why") for out-of-range values.
    Relative paths are relative to the config file's folder.
    """

    on_error: str = "fail"
    """fail: an error fails the request (``internal``, naming the plugin); skip: the plugin is
    skipped for that call, with a warning in the log."""


def build_settings(
    cls: type, raw: Mapping[str, Any], name: str, *, where: str = "config", base_dir: Path | None = None
) -> Any:
    """Validate the table ``[plugins.NAME]`` against the dataclass ``cls``; ConfigError names the key."""
    base_dir = base_dir or Path.cwd()
    section = f"[plugins.{name}]"
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # pragma: no cover - a broken annotation in a plugin
        raise ConfigError(f"plugin {name!r}: Settings annotations cannot be resolved: {exc}") from exc
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: {section} unknown key {key!r} (known: {known})")
        kwargs[key] = coerce_value(hints[key], value, f"{section} {key}", where, base_dir)
    for key, f in fields.items():
        if key not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: {section} {key}: required")
    if "on_error" in kwargs and kwargs["on_error"] not in ON_ERROR:
        raise ConfigError(f"{where}: {section} on_error: must be one of {', '.join(ON_ERROR)}, not {kwargs['on_error']!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {section} {exc}") from None
