"""The plugin host: registers plugins from every source, checks them, calls hooks in a defined order.

Where plugins come from and in which order is :mod:`voiced.hooks.sources`; the built-in
engines (``voiced.hooks.builtin``, name ``builtin``) come first. A plugin's name is its
entry-point name or file stem; two plugins with one name are a config error. Its settings are
the config table ``[plugins.NAME]``, validated against the dataclass ``Settings`` its module
declares (a subclass of :class:`PluginSettings`; modules without one accept only
``on_error``). A module that defines ``plugin(settings)`` is asked for its plugin object with
the validated settings (so it can hold state); otherwise the module itself is the plugin
(module-level ``@hookimpl`` functions).

Hooks are not called through pluggy's LIFO ``pm.hook.X()``: the wrappers below walk the
implementations in the order above and call each one, so chaining is defined, every call is
timed per plugin (:meth:`PluginHost.timings`), and an error names its plugin
(:class:`PluginError`). ``VOICED_TRACE_PLUGINS=1`` logs every call with its duration.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pluggy

from voiced.engines.base import ParamError, SpeakerEncoder
from voiced.errors import ConfigError, VoicedError
from voiced.hooks import builtin, sources, specs
from voiced.hooks.settings import PluginSettings, build_settings
from voiced.hooks.sources import describe as _describe
from voiced.hooks.specs import EngineContext, EngineFactory, SynthesisService

log = logging.getLogger(__name__)

TRACE_ENV = "VOICED_TRACE_PLUGINS"
BUILTIN = "builtin"

__all__ = ["PluginError", "PluginHost", "new_request"]


class PluginError(VoicedError):
    """A plugin raised (or returned something unusable); the message names the plugin.

    The server answers ``internal`` with this message; the traceback is in the daemon's log.
    """

    def __init__(self, plugin: str, message: str, *, hook: str | None = None) -> None:
        self.plugin = plugin
        self.hook = hook
        self.message = message
        super().__init__(f"plugin {plugin!r}: {message}")


@dataclass
class _Loaded:
    name: str
    source: str
    plugin: Any
    settings: PluginSettings


@dataclass
class _Timing:
    calls: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    errors: int = 0


def new_request(
    *,
    text: str,
    voice: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    fmt: str = "wav",
    stream: bool = False,
    request_id: Any = None,
) -> dict[str, Any]:
    """The ``request`` dict the synthesis hooks receive (``seq``/``final`` set per call)."""
    return {
        "key": uuid.uuid4().hex,
        "id": request_id,
        "text": text,
        "spoken_text": text,
        "voice": {k: voice.get(k) for k in ("name", "sha256", "stage") if voice.get(k) is not None},
        "params": dict(params or {}),
        "format": fmt,
        "stream": bool(stream),
        "seq": 0,
        "final": not stream,
    }


class PluginHost:
    """The daemon's plugins: loaded and checked at construction, called through typed wrappers.

    ``config`` is the ``[plugins]`` section; ``settings`` overrides its ``settings`` mapping
    (``{name: {key: value}}``, the ``[plugins.NAME]`` tables); ``source`` is the config file
    (for messages and relative paths). Raises ConfigError for anything wrong with the plugin
    setup: unknown name, a module that fails to import, a misspelled hook, bad settings.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        source: Path | None = None,
        extra: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        entry_points: bool = True,
    ) -> None:
        self.where = str(source) if source else "config"
        self.base_dir = Path(source).parent if source else Path.cwd()
        enabled = tuple(getattr(config, "enabled", ()) or ())
        paths = tuple(Path(p) for p in (getattr(config, "paths", ()) or ()))
        raw_settings = dict(settings if settings is not None else (getattr(config, "settings", None) or {}))
        self.trace = os.environ.get(TRACE_ENV, "").strip().lower() not in ("", "0", "false", "no")
        self.pm = pluggy.PluginManager(specs.PROJECT)
        self.pm.add_hookspecs(specs)
        self._plugins: dict[str, _Loaded] = {}
        self._order: dict[str, int] = {}
        self._impls: dict[str, list[Any]] = {}
        self._timings: dict[str, _Timing] = {}
        self._lock = threading.Lock()
        self._engines: dict[str, tuple[str, EngineFactory]] | None = None

        candidates: list[tuple[str, str, Any]] = []  # (name, source, module or object)
        candidates.append((BUILTIN, "built-in", builtin))
        candidates += sources.enabled(enabled, self.where)
        extra_items = list(extra.items()) if isinstance(extra, Mapping) else list(extra)
        candidates += [(name, "in-process", obj) for name, obj in extra_items]
        candidates += sources.from_paths(paths, self.base_dir, self.where)
        if entry_points:
            candidates += sources.from_entry_points()

        for name, where, obj in candidates:
            if name in self._plugins:
                raise ConfigError(
                    f"{self.where}: [plugins]: two plugins are named {name!r} "
                    f"({self._plugins[name].source} and {where})"
                )
            self._add(name, where, obj, raw_settings.get(name))
        self._check_settings_names(raw_settings)
        self._check_hooks()
        log.debug("plugins loaded: %s", ", ".join(self.names()) or "none")

    # ------------------------------------------------------------------ loading

    def _add(self, name: str, source: str, obj: Any, raw: Mapping[str, Any] | None) -> None:
        is_module = isinstance(obj, types.ModuleType)
        settings_cls = getattr(obj, "Settings", None) if is_module else None
        if settings_cls is None:
            settings_cls = PluginSettings
        elif not (dataclasses.is_dataclass(settings_cls) and isinstance(settings_cls, type)):
            raise ConfigError(f"plugin {name!r} ({source}): Settings must be a dataclass")
        settings = build_settings(settings_cls, raw or {}, name, where=self.where, base_dir=self.base_dir)
        plugin = obj
        factory = getattr(obj, "plugin", None) if is_module else None
        if callable(factory):
            try:
                plugin = factory(settings)
            except (ConfigError, PluginError):
                raise
            except ValueError as exc:  # by convention "key: why"
                raise ConfigError(f"{self.where}: [plugins.{name}] {exc}") from exc
            except OSError as exc:  # a folder or file the settings name cannot be used
                raise ConfigError(f"{self.where}: [plugins.{name}] {_describe(exc)}") from exc
            except Exception as exc:
                raise ConfigError(f"plugin {name!r} ({source}) failed to start: {_describe(exc)}") from exc
        if is_module:
            _warn_unmarked(name, obj)
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise ConfigError(f"plugin {name!r} ({source}): {message}") from exc
        except ValueError as exc:
            raise ConfigError(f"plugin {name!r} ({source}) cannot be registered: {exc}") from exc
        self._plugins[name] = _Loaded(name, source, plugin, settings)
        self._order[name] = len(self._order)

    def _check_settings_names(self, raw_settings: Mapping[str, Any]) -> None:
        known = sources.optional_names()
        for name, table in raw_settings.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"{self.where}: [plugins.{name}] must be a table")
            if name in self._plugins:
                continue
            if name in known:
                log.warning("%s: [plugins.%s] is set but the plugin is not in [plugins] enabled", self.where, name)
                continue
            close = difflib.get_close_matches(name, list(self._plugins), n=1)
            hint = f"; did you mean [plugins.{close[0]}]?" if close else ""
            raise ConfigError(f"{self.where}: [plugins.{name}]: no plugin named {name!r} is loaded{hint}")

    def _check_hooks(self) -> None:
        """Every @hookimpl must name a known hook (a typo fails here, naming the plugin)."""
        names = [n for n in dir(specs) if n.startswith("voiced_")]
        for hook_name, caller in list(vars(self.pm.hook).items()):
            if not isinstance(caller, pluggy.HookCaller):
                continue
            for impl in caller.get_hookimpls():
                if impl.hookwrapper or getattr(impl, "wrapper", False):
                    raise ConfigError(
                        f"plugin {impl.plugin_name!r}: {hook_name} is a hook wrapper; voiced calls hooks "
                        f"in its own order and does not support wrappers"
                    )
                if caller.spec is None and not impl.optionalhook:
                    close = difflib.get_close_matches(hook_name, names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ConfigError(
                        f"plugin {impl.plugin_name!r}: {hook_name!r} is not a voiced hook{hint} "
                        f"(hooks: {', '.join(names)})"
                    )
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:  # pragma: no cover - caught above
            plugin = self.pm.get_name(exc.plugin) if exc.plugin is not None else "?"
            raise ConfigError(f"plugin {plugin!r}: {exc}") from exc

    # ------------------------------------------------------------------ introspection

    def names(self) -> list[str]:
        """Loaded plugins in calling order (``builtin`` first)."""
        return sorted(self._plugins, key=self._order.__getitem__)

    def settings(self, name: str) -> PluginSettings:
        return self._plugins[name].settings

    def get(self, name: str) -> Any:
        """The registered plugin object (the module, or what its ``plugin()`` returned)."""
        return self._plugins[name].plugin

    def has_hook(self, hook: str) -> bool:
        """Whether any plugin implements ``hook`` (lets the server skip work nobody wants)."""
        return bool(self._hook_impls(hook))

    def timings(self) -> dict[str, dict[str, Any]]:
        """Per plugin: ``calls``, ``total_ms``, ``max_ms``, ``errors`` since start (for ``status``)."""
        with self._lock:
            return {
                name: {
                    "calls": t.calls,
                    "total_ms": round(t.total_s * 1000, 3),
                    "max_ms": round(t.max_s * 1000, 3),
                    "errors": t.errors,
                }
                for name, t in sorted(self._timings.items(), key=lambda kv: self._order.get(kv[0], 1 << 30))
            }

    def status(self) -> dict[str, Any]:
        """What the ``status`` op shows: the plugins, their source and hooks, and their timings."""
        loaded = []
        for name in self.names():
            callers = self.pm.get_hookcallers(self._plugins[name].plugin) or []
            loaded.append({"name": name, "source": self._plugins[name].source, "hooks": sorted(c.name for c in callers)})
        return {"loaded": loaded, "timings": self.timings()}

    # ------------------------------------------------------------------ calling

    def _hook_impls(self, hook: str) -> list[Any]:
        impls = self._impls.get(hook)
        if impls is None:
            caller = getattr(self.pm.hook, hook)
            impls = sorted(caller.get_hookimpls(), key=lambda impl: self._order.get(impl.plugin_name, 1 << 30))
            self._impls[hook] = impls
        return impls

    def _call(self, impl: Any, hook: str, kwargs: Mapping[str, Any]) -> Any:
        args = [kwargs[name] for name in impl.argnames]
        started = time.perf_counter()
        failed = False
        try:
            return impl.function(*args)
        except BaseException:
            failed = True
            raise
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                timing = self._timings.setdefault(impl.plugin_name, _Timing())
                timing.calls += 1
                timing.total_s += elapsed
                timing.max_s = max(timing.max_s, elapsed)
                timing.errors += failed
            if self.trace:
                log.info("plugin %s: %s took %.3f ms%s", impl.plugin_name, hook, elapsed * 1000, " (raised)" if failed else "")

    def _count_error(self, name: str) -> None:
        with self._lock:
            self._timings.setdefault(name, _Timing()).errors += 1

    def _on_error(self, name: str, hook: str, exc: BaseException, *, policy: bool = True) -> None:
        """Log a plugin's error; raise PluginError unless the plugin (or the hook) says skip."""
        if not policy:
            log.error("plugin %s failed in %s: %s", name, hook, _describe(exc), exc_info=exc)
            return
        settings = self._plugins[name].settings if name in self._plugins else None
        if settings is not None and settings.on_error == "skip":
            log.warning("plugin %s failed in %s and is skipped for this call (on_error = \"skip\"): %s",
                        name, hook, _describe(exc), exc_info=exc)
            return
        log.error("plugin %s failed in %s: %s", name, hook, _describe(exc), exc_info=exc)
        raise PluginError(name, f"{hook} failed: {_describe(exc)}", hook=hook) from exc

    def _broadcast(self, hook: str, kwargs: Mapping[str, Any], *, policy: bool) -> None:
        for impl in self._hook_impls(hook):
            try:
                self._call(impl, hook, kwargs)
            except Exception as exc:
                self._on_error(impl.plugin_name, hook, exc, policy=policy)

    # ------------------------------------------------------------------ the hooks

    def register_engines(self) -> dict[str, EngineFactory]:
        """``{engine name: factory}`` from every plugin (the built-in ``kokoro`` included)."""
        if self._engines is None:
            found: dict[str, tuple[str, EngineFactory]] = {}
            for impl in self._hook_impls("voiced_register_engines"):
                owner = impl.plugin_name

                def register(name: str, factory: EngineFactory, _owner: str = owner) -> None:
                    if not isinstance(name, str) or not name or not callable(factory):
                        raise TypeError("register(name, factory) needs a non-empty name and a callable factory")
                    if name in found:
                        raise ConfigError(
                            f"engine {name!r} is registered by two plugins: {found[name][0]!r} and {_owner!r}"
                        )
                    found[name] = (_owner, factory)

                try:
                    self._call(impl, "voiced_register_engines", {"register": register})
                except ConfigError:
                    raise
                except Exception as exc:
                    self._on_error(owner, "voiced_register_engines", exc)
            self._engines = found
        return {name: factory for name, (_, factory) in self._engines.items()}

    def create_engine(self, engine_config: Any, cache_dir: Path, encoder: SpeakerEncoder | None) -> Any:
        """Build the engine ``[engine] name`` selects (constructed, not loaded)."""
        factories = self.register_engines()
        name = engine_config.name
        if name not in factories:
            raise ConfigError(
                f"{self.where}: [engine] name: unknown engine {name!r} (registered: {', '.join(sorted(factories)) or 'none'})"
            )
        context = EngineContext(
            cache_dir=Path(cache_dir),
            encoder=encoder,
            options=dict(engine_config.options),
            device=engine_config.device,
        )
        try:
            return factories[name](context)
        except (TypeError, ParamError) as exc:  # an unknown option, or a bad value for one
            raise ConfigError(f"{self.where}: [engine] options: {exc}") from None

    def preprocess_text(self, text: str, voice: str, params: Mapping[str, Any]) -> str:
        """Run ``voiced_preprocess_text`` down the chain; returns the text to speak."""
        def check(result: Any) -> str:
            if not isinstance(result, str):
                raise TypeError(f"returned {type(result).__name__}, expected str or None")
            return result

        return self._chain("voiced_preprocess_text", "text", text, {"voice": voice, "params": params}, check)

    def postprocess_audio(self, audio: np.ndarray, sample_rate: int, request: Mapping[str, Any]) -> np.ndarray:
        """Run ``voiced_postprocess_audio`` down the chain; returns mono float32."""
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        return self._chain("voiced_postprocess_audio", "audio", audio,
                           {"sample_rate": sample_rate, "request": dict(request)}, _check_audio)

    def _chain(self, hook: str, name: str, value: Any, kwargs: Mapping[str, Any], check: Callable[[Any], Any]) -> Any:
        """Pass ``value`` (argument ``name``) down the plugins of ``hook``: each may return a
        replacement (``check`` vets it; a wrong one counts as that plugin's error) or None."""
        for impl in self._hook_impls(hook):
            try:
                result = self._call(impl, hook, {name: value, **kwargs})
                if result is not None:
                    try:
                        result = check(result)
                    except (TypeError, ValueError):
                        self._count_error(impl.plugin_name)
                        raise
            except Exception as exc:
                self._on_error(impl.plugin_name, hook, exc)
                continue
            if result is not None:
                value = result
        return value

    def synthesis_done(
        self, request: Mapping[str, Any], audio: np.ndarray, sample_rate: int, timings: Mapping[str, Any]
    ) -> None:
        """Run ``voiced_synthesis_done``; errors are logged, never raised (the reply is sent)."""
        self._broadcast(
            "voiced_synthesis_done",
            {"request": dict(request), "audio": audio, "sample_rate": sample_rate, "timings": dict(timings)},
            policy=False,
        )

    def voice_event(self, kind: str, voice: Mapping[str, Any]) -> None:
        """A library listener: ``ready``/``failed``/``removed`` go to their hooks, others are ignored.

        Errors are logged with the plugin's name, never raised.
        """
        hook = {"ready": "voiced_voice_ready", "failed": "voiced_voice_failed", "removed": "voiced_voice_removed"}.get(kind)
        if hook is None:
            return
        self._broadcast(hook, {"voice": dict(voice)}, policy=False)

    def serve(self, service: SynthesisService) -> None:
        """Run ``voiced_serve``; raises PluginError for a failing plugin unless it says skip."""
        self._broadcast("voiced_serve", {"service": service}, policy=True)

    def startup(self, daemon_info: Mapping[str, Any]) -> None:
        """Run ``voiced_startup``; raises PluginError for a failing plugin unless it says skip."""
        self._broadcast("voiced_startup", {"daemon_info": dict(daemon_info)}, policy=True)

    def shutdown(self) -> None:
        """Run ``voiced_shutdown`` in reverse order; errors are logged, never raised."""
        hook = "voiced_shutdown"
        for impl in reversed(self._hook_impls(hook)):
            try:
                self._call(impl, hook, {})
            except Exception as exc:
                self._on_error(impl.plugin_name, hook, exc, policy=False)


# ---------------------------------------------------------------------- helpers


def _check_audio(result: Any) -> np.ndarray:
    array = np.asarray(result)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"returned {type(result).__name__} of {array.dtype}, expected a float array or None")
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise TypeError(f"returned an array of shape {array.shape}, expected mono (1-D)")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("returned NaN or infinite samples")
    return array


def _warn_unmarked(name: str, module: types.ModuleType) -> None:
    """A ``voiced_*`` function without ``@hookimpl`` is silently ignored by pluggy; say so."""
    marker = f"{specs.PROJECT}_impl"
    for attr, value in vars(module).items():
        if attr.startswith("voiced_") and callable(value) and not hasattr(value, marker):
            if getattr(value, "__module__", None) != module.__name__:
                continue  # imported from elsewhere
            log.warning("plugin %s: function %s is not marked @hookimpl and is ignored", name, attr)
