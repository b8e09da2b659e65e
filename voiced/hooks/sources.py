"""Where plugins come from, in calling order after the built-in engines:

1. the plugins ``[plugins] enabled`` names, in that order: entry points of the group
   ``voiced.optional``, where this package declares its first-party plugins (the modules in
   the top-level ``plugins/`` folder) and other packages may declare plugins that stay off
   until named;
2. plugins handed over in-process (tests, embedding);
3. every ``*.py`` module in the folders of ``[plugins] paths``, by name (the file's stem);
4. entry points of the group ``voiced``, by name: installing such a package enables it.

Each source returns ``(name, where it came from, module or object)``; the host registers them.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from voiced.errors import ConfigError

ENTRY_POINT_GROUP = "voiced"
OPTIONAL_GROUP = "voiced.optional"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Candidate = tuple[str, str, Any]  # (name, where it came from, module or object)


def _optional() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=OPTIONAL_GROUP):
        found.setdefault(ep.name, ep)  # one distribution seen twice on sys.path lists it twice
    return found


def optional_names() -> list[str]:
    """The plugins that load when ``[plugins] enabled`` names them (the first-party ones and others)."""
    return sorted(_optional())


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
    return "first-party" if dist == "voiced" else f"package {dist}"


def enabled(names: tuple[str, ...], where: str) -> list[Candidate]:
    """The plugins ``[plugins] enabled`` names, loaded, in its order."""
    out: list[Candidate] = []
    available = _optional()
    known = sorted(available)
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name) or name not in available:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: [plugins] enabled: unknown plugin {name!r}{hint} (available: {', '.join(known)})"
            )
        if any(n == name for n, _, _ in out):
            raise ConfigError(f"{where}: [plugins] enabled: {name!r} is listed twice")
        ep = available[name]
        try:
            module = ep.load()
        except Exception as exc:
            raise ConfigError(f"{where}: [plugins] enabled: plugin {name!r} cannot be loaded: {describe(exc)}") from exc
        out.append((name, _origin(ep), module))
    return out


def from_paths(paths: tuple[Path, ...], base_dir: Path, where: str) -> list[Candidate]:
    """Every ``*.py`` module in the folders ``paths`` (relative to ``base_dir``), by file name."""
    out: list[Candidate] = []
    for index, folder in enumerate(paths):
        folder = folder if folder.is_absolute() else base_dir / folder
        if not folder.is_dir():
            raise ConfigError(f"{where}: [plugins] paths: folder does not exist: {folder}")
        for file in sorted(folder.glob("*.py")):
            if file.name.startswith(("_", ".")):
                continue
            name = file.stem
            module_name = f"voiced_plugin_path_{index}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
            spec = importlib.util.spec_from_file_location(module_name, file)
            if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
                raise ConfigError(f"{where}: [plugins] paths: cannot load {file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                sys.modules.pop(module_name, None)
                raise ConfigError(f"{where}: [plugins] paths: plugin {name!r} ({file}) cannot be loaded: {describe(exc)}") from exc
            out.append((name, f"file {file}", module))
    return sorted(out, key=lambda c: c[0])


def from_entry_points() -> list[Candidate]:
    """Installed packages' plugins (entry-point group ``voiced``), by name."""
    out: list[Candidate] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        try:
            obj = ep.load()
        except Exception as exc:
            raise ConfigError(
                f"plugin {ep.name!r} (entry point {ep.value} of package {dist}) cannot be loaded: {describe(exc)}"
            ) from exc
        out.append((ep.name, f"package {dist}", obj))
    return sorted(out, key=lambda c: c[0])


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
