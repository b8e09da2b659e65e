"""Configuration: TOML file -> validated, typed, frozen objects.

Every key is declared once, in the dataclasses below, with its type and default. Loading
checks unknown keys, wrong types and missing folders and reports each as one line naming
the key and the file (``voiced.toml: [voices] dir: folder does not exist: /x``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from voiced.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_ENV = "VOICED_CONFIG"
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif", "w64", "caf")


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_data_dir() -> Path:
    """Where voices live by default: systemd's StateDirectory, else the XDG data home."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    return _xdg("XDG_DATA_HOME", ".local/share") / "voiced"


def default_cache_dir() -> Path:
    cache = os.environ.get("CACHE_DIRECTORY")
    if cache:
        return Path(cache.split(":")[0])
    return _xdg("XDG_CACHE_HOME", ".cache") / "voiced"


def default_endpoint() -> str:
    return "tcp://127.0.0.1:5599"


@dataclass(frozen=True)
class VoicesConfig:
    dir: Path = field(default_factory=lambda: default_data_dir() / "voices")
    """The watched folder. Subfolders are included; a voice's name is its relative path without extension."""
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS
    """File extensions taken as reference recordings (case-insensitive, without the dot)."""
    min_duration_s: float = 1.0
    """Recordings shorter than this (after silence trimming) fail with a reason."""
    max_duration_s: float = 30.0
    """Only the first this-many seconds of longer recordings are used (the voice says so)."""
    settle_s: float = 1.0
    """For writers that neither close nor rename: prepare once the size has been stable this long."""
    observer: str = "auto"
    """auto | inotify | polling. Polling is for network filesystems where inotify sees nothing."""
    poll_interval_s: float = 2.0
    """How often the polling observer scans the folder."""
    rescan_interval_s: float = 300.0
    """A full reconcile this often, as a safety net for missed events (0 = never; overflows still rescan)."""
    rename_grace_s: float = 30.0
    """A deleted file's cache entries are kept this long, so a move (delete + create) reuses them."""
    follow_symlinks: bool = True
    """Symlinks are followed when they point inside the folder; pointing outside always fails."""


@dataclass(frozen=True)
class CacheConfig:
    dir: Path = field(default_factory=default_cache_dir)
    """Embeddings, engine conditioning and the index. Created 0700 when missing."""
    size_limit_mb: float = 2048.0
    """Least-recently-used entries are evicted above this size (0 = no limit)."""
    shared_dir: str = ""
    """A folder several machines mount (NFS, SMB, ...) holding the artefacts they share: a voice
    prepared on one machine is read from there by the others, and [cache] dir becomes each
    machine's read-through copy. Empty = nothing shared."""

    @property
    def size_limit_bytes(self) -> int | None:
        """The size limit as the stores take it: None for no limit."""
        return int(self.size_limit_mb * 2**20) or None


@dataclass(frozen=True)
class EncoderConfig:
    device: str = "auto"
    """auto | cpu | cuda | cuda:N for the speaker encoder."""
    weights: str = ""
    """Path of the GE2E weights; empty = resemblyzer/pretrained.pt from the installed wheel."""
    preprocess: bool = True
    """Normalise volume and trim long silences before embedding (as the reference pipeline)."""
    threads: int = 0
    """CPU threads for the encoder (0 = torch's default)."""


@dataclass(frozen=True)
class EngineConfig:
    name: str = "kokoro"
    """The synthesis engine, by its registered name."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    refine_budget_s: float = 60.0
    """Budget of a voice's later preparation stages (e.g. kokoro's refined fit), per voice. Kokoro
    turns it into fixed work (what takes that long on a 2-core x86 CPU), so a file gives the same
    voice on any machine; it cuts a fit short only after three budgets of real time."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Engine-specific options (see the engine's documentation)."""


@dataclass(frozen=True)
class ServerConfig:
    endpoints: tuple[str, ...] = (default_endpoint(),)
    """ZeroMQ endpoints the daemon binds (tcp:// or ipc://)."""
    max_message_bytes: int = 1 << 20
    """Largest request frame accepted (set on the socket)."""
    max_text_chars: int = 20000
    """Longest synthesis text accepted."""
    max_json_depth: int = 16
    """Deepest JSON nesting accepted in a request."""
    queue_size: int = 32
    """Synthesis requests waiting beyond this are answered `busy`."""
    synthesis_threads: int = 1
    """Synthesis requests run side by side; an engine that batches (kokoro on torch) then runs
    their sentences as one model call."""
    stop_timeout_s: float = 10.0
    """On SIGTERM, requests in flight get this long to finish."""
    curve_secret_key: str = ""
    """Path of the server's CURVE secret key file (``NAME.key_secret`` from `voiced keygen`).
    Set: every tcp:// endpoint requires CURVE and only clients in curve_clients_dir get in."""
    curve_clients_dir: str = ""
    """Folder of the allowed clients' public ``.key`` files (re-read on SIGHUP)."""
    allow_insecure: bool = False
    """Allow binding a non-loopback tcp:// address without CURVE (logged as a warning)."""
    ipc_group: str = ""
    """Group to give ipc:// socket files to (they are mode 0660); empty = the daemon's group."""


@dataclass(frozen=True)
class PluginsConfig:
    enabled: tuple[str, ...] = ()
    """Plugins to enable, by name, in calling order: the first-party ones (plugins/) and any
    installed package's plugin declared in the entry-point group ``voiced.optional``."""
    paths: tuple[Path, ...] = ()
    """Extra folders of plugin modules."""
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Each plugin's table ``[plugins.NAME]``, as written; validated by voiced.hooks.PluginHost
    against the plugin's ``Settings`` (it knows the plugin's keys and types)."""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    """debug | info | warning | error."""
    format: str = "auto"
    """auto | text | journal. auto = journal when running under systemd's journal."""


@dataclass(frozen=True)
class ClusterConfig:
    address: str = ""
    """The Ray cluster that synthesizes: "auto" (the one this machine belongs to), "ray://host:10001",
    or empty for none (the daemon synthesizes itself). Needs the `cluster` extra and [cache] shared_dir."""
    min_replicas: int = 1
    """Synthesis replicas, each holding a warm engine, never fewer than this..."""
    max_replicas: int = 1
    """... and never more: Ray Serve adds replicas while requests queue and removes idle ones."""
    requests_per_replica: int = 4
    """Requests a replica runs at once (its engine batches their sentences where it can); the
    autoscaler aims at this many per replica."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each replica."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for each replica (a fraction shares one GPU)."""
    voices_per_replica: int = 32
    """Prepared voices a replica keeps in memory; requests go to a replica that holds their voice."""
    retries: int = 2
    """A request whose replica died is run again on another this many times."""
    app_name: str = "voiced"
    """The Ray Serve application's name (one per daemon sharing a cluster)."""
    preparers: int = 1
    """Preparation replicas: each prepares one voice at a time (the engine's stages, the costly
    refinement above all), so this many voices are prepared at once; one lost mid-stage costs a
    retry on another. 0 = voices are prepared on this machine."""
    preparer_num_cpus: float = 1.0
    """CPUs Ray reserves for each preparation replica."""
    preparer_num_gpus: float = 0.0
    """GPUs Ray reserves for each preparation replica."""


@dataclass(frozen=True)
class Config:
    voices: VoicesConfig = field(default_factory=VoicesConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = None
    """The file this was loaded from (None = built-in defaults)."""


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("voices", "observer"): ("auto", "inotify", "polling"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "format"): ("auto", "text", "journal"),
}

# str keys holding an optional path: resolved like Path keys (relative to the file, ~, $VARS) when set
_PATH_STRINGS: dict[str, tuple[str, ...]] = {"server": ("curve_secret_key", "curve_clients_dir"),
                                             "cache": ("shared_dir",)}

_SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Config).items() if name != "source"
}


def find_config_file(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to use: --config, then $VOICED_CONFIG, then the usual places."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    candidates = []
    conf_dir = os.environ.get("CONFIGURATION_DIRECTORY")
    if conf_dir:
        candidates.append(Path(conf_dir.split(":")[0]) / "config.toml")
    candidates.append(_xdg("XDG_CONFIG_HOME", ".config") / "voiced" / "config.toml")
    candidates.append(Path("/etc/voiced/config.toml"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def load_config(path: str | os.PathLike | None = None, *, check_dirs: bool = True) -> Config:
    """Load and validate the config file found by :func:`find_config_file` (defaults if none)."""
    file = find_config_file(path)
    if file is None:
        return Config()
    try:
        with open(file, "rb") as fh:
            data = fh.read()
        # a byte-order mark, as Windows editors write one, is not part of the document
        raw = tomllib.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{file}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                          "TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    return parse_config(raw, source=file, check_dirs=check_dirs)


def parse_config(raw: Mapping[str, Any], *, source: Path | None = None, check_dirs: bool = True) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    where = str(source) if source else "config"
    base_dir = source.parent if source else Path.cwd()
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section [{name}] (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        sections[name] = _build_section(_SECTIONS[name], name, value, where, base_dir)
    config = Config(**sections, source=source)
    if config.cluster.address and not config.cache.shared_dir:
        # replicas on other machines read the prepared voices from there
        raise ConfigError(f"{where}: [cluster] address: a cluster needs [cache] shared_dir, a folder every machine mounts")
    if check_dirs:
        _check_dirs(config, where, explicit_voices="dir" in raw.get("voices", {}))
    return config


def _build_section(cls: type, section: str, values: Mapping[str, Any], where: str, base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    path_strings = _PATH_STRINGS.get(section, ())
    if section == "plugins":  # [plugins.NAME] sub-tables are the plugins' own settings
        known.discard("settings")
        kwargs["settings"] = {k: dict(v) for k, v in values.items() if isinstance(v, dict) and k not in known}
        values = {k: v for k, v in values.items() if k not in kwargs["settings"]}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{where}: [{section}] unknown key {key!r} (known: {', '.join(sorted(known))})"
            )
        kwargs[key] = coerce_value(hints[key], value, f"[{section}] {key}", where, base_dir)
        if key in path_strings and kwargs[key]:  # optional paths: "" = not set
            kwargs[key] = str(coerce_value(Path, kwargs[key], f"[{section}] {key}", where, base_dir))
        choices = _CHOICES.get((section, key))
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{where}: [{section}] {key}: must be one of {', '.join(choices)}, not {value!r}")
    obj = cls(**kwargs)
    _check_values(obj, section, where)
    return obj


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin in (dict, collections.abc.Mapping):
        return "table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path string"}.get(tp, str(tp))


def coerce_value(tp: Any, value: Any, key: str, where: str, base_dir: Path) -> Any:
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{where}: {key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in options:
            try:
                return coerce_value(option, value, key, where, base_dir)
            except ConfigError:
                continue
        raise wrong
    if origin is tuple:
        if not isinstance(value, list):
            raise wrong
        inner = typing.get_args(tp)[0]
        return tuple(coerce_value(inner, item, key, where, base_dir) for item in value)
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise wrong
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            out[str(k)] = v if inner is Any else coerce_value(inner, v, f"{key}.{k}", where, base_dir)
        return out
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise wrong
        path = Path(os.path.expandvars(value)).expanduser()
        return path if path.is_absolute() else base_dir / path
    raise ConfigError(f"{where}: {key}: unsupported setting type {tp!r}")


def _check_values(obj: Any, section: str, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"[{section}] {f.name}"
        if isinstance(value, float) and not math.isfinite(value):  # TOML allows nan and inf
            raise ConfigError(f"{where}: {key}: must be a finite number, got {value}")
        if isinstance(value, float) and f.name.endswith("_s") and value < 0:
            raise ConfigError(f"{where}: {key}: must not be negative, got {value}")
    if section == "voices":
        if obj.min_duration_s > obj.max_duration_s:
            raise ConfigError(f"{where}: [voices] min_duration_s: larger than max_duration_s")
        if not obj.extensions:
            raise ConfigError(f"{where}: [voices] extensions: must not be empty")
        if obj.poll_interval_s <= 0:
            raise ConfigError(f"{where}: [voices] poll_interval_s: must be positive")
    if section in ("encoder", "engine"):
        _check_device(obj.device, f"[{section}] device", where)
    if section == "server":
        if not obj.endpoints:
            raise ConfigError(f"{where}: [server] endpoints: at least one endpoint is needed")
        for endpoint in obj.endpoints:
            if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f"{where}: [server] endpoints: {endpoint!r} is not tcp://, ipc:// or inproc://")
        twice = sorted({e for e in obj.endpoints if obj.endpoints.count(e) > 1})
        if twice:
            raise ConfigError(f"{where}: [server] endpoints: {twice[0]!r} is listed twice")
        for name in ("max_message_bytes", "max_text_chars", "max_json_depth", "queue_size", "synthesis_threads"):
            if getattr(obj, name) <= 0:
                raise ConfigError(f"{where}: [server] {name}: must be positive")
    if section == "cluster":
        for name in ("min_replicas", "requests_per_replica", "voices_per_replica"):
            if getattr(obj, name) <= 0:
                raise ConfigError(f"{where}: [cluster] {name}: must be positive")
        if obj.max_replicas < obj.min_replicas:
            raise ConfigError(f"{where}: [cluster] max_replicas: smaller than min_replicas")
        for name in ("num_cpus", "num_gpus", "retries", "preparers", "preparer_num_cpus", "preparer_num_gpus"):
            if getattr(obj, name) < 0:
                raise ConfigError(f"{where}: [cluster] {name}: must not be negative")
    if section == "cache" and obj.size_limit_mb < 0:
        raise ConfigError(f"{where}: [cache] size_limit_mb: must not be negative")


def _check_device(device: str, key: str, where: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise ConfigError(f"{where}: {key}: must be auto, cpu, cuda or cuda:N, not {device!r}")


def _check_dirs(config: Config, where: str, *, explicit_voices: bool) -> None:
    voices = config.voices.dir
    if explicit_voices and not voices.is_dir():
        reason = "is not a folder" if voices.exists() else "folder does not exist"
        raise ConfigError(f"{where}: [voices] dir: {reason}: {voices}")
    cache_parent = config.cache.dir.parent
    if config.cache.dir.exists() and not config.cache.dir.is_dir():
        raise ConfigError(f"{where}: [cache] dir: is not a folder: {config.cache.dir}")
    if not config.cache.dir.exists() and not _creatable(cache_parent):
        raise ConfigError(f"{where}: [cache] dir: cannot be created, no folder above it: {config.cache.dir}")
    shared = config.cache.shared_dir
    if shared and not Path(shared).is_dir():  # a mount point: never created here, or the share would be missed
        reason = "is not a folder" if Path(shared).exists() else "folder does not exist (is the share mounted?)"
        raise ConfigError(f"{where}: [cache] shared_dir: {reason}: {shared}")
    for path in config.plugins.paths:
        if not path.is_dir():
            raise ConfigError(f"{where}: [plugins] paths: folder does not exist: {path}")
    from voiced.security import check_server

    check_server(config.server, where)


def _creatable(path: Path) -> bool:
    # mkdir -p would create the missing parents; at least one ancestor must be a folder
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            return ancestor.is_dir()
    return False


def ensure_dirs(config: Config) -> None:
    """Create the default voices folder and the cache folder (0700) when missing."""
    config.voices.dir.mkdir(parents=True, exist_ok=True)
    config.cache.dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved values, JSON/TOML-friendly (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    out: dict[str, Any] = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        out[name] = {f.name: plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    # [plugins.NAME] tables print as sub-tables of [plugins], as they are written
    out["plugins"].update(out["plugins"].pop("settings", {}))
    return out


def to_toml(config: Config) -> str:
    """Render the resolved values as TOML (what `voiced check-config` prints)."""
    lines: list[str] = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        nested: list[tuple[str, dict]] = []
        for key, value in values.items():
            if isinstance(value, dict):
                nested.append((key, value))
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        for key, table in nested:
            inline = ", ".join(f"{k} = {_toml_value(v)}" for k, v in table.items())
            lines.append(f"{key} = {{{inline}}}" if inline else f"{key} = {{}}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)
