"""Configuration: TOML -> typed values, one clear error naming the key and the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from voiced.config import Config, load_config, parse_config, to_toml
from voiced.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "voiced.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VOICED_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nothing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None)
    assert config.source is None or not config.source.exists() or config.source == Path("/etc/voiced/config.toml")
    assert config.engine.name == "kokoro"
    assert config.server.endpoints == ("tcp://127.0.0.1:5599",)


def test_full_file_is_typed(tmp_path: Path) -> None:
    voices = tmp_path / "v"
    voices.mkdir()
    path = write(
        tmp_path,
        f"""
[voices]
dir = "{voices}"
extensions = ["wav", "flac"]
min_duration_s = 2
settle_s = 0.25
observer = "polling"
[cache]
dir = "cache"
size_limit_mb = 10
[engine]
device = "cuda:1"
[engine.options]
speed = 1.1
[server]
endpoints = ["tcp://127.0.0.1:7000", "ipc:///tmp/x.sock"]
[log]
level = "debug"
""",
    )
    config = load_config(path)
    assert config.voices.dir == voices
    assert config.voices.extensions == ("wav", "flac")
    assert config.voices.min_duration_s == 2.0 and isinstance(config.voices.min_duration_s, float)
    assert config.voices.observer == "polling"
    assert config.cache.dir == tmp_path / "cache"  # relative paths are relative to the file
    assert config.engine.device == "cuda:1"
    assert config.engine.options == {"speed": 1.1}
    assert config.server.endpoints == ("tcp://127.0.0.1:7000", "ipc:///tmp/x.sock")
    assert config.source == path


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[voices]\ndirr = '/tmp'\n", "[voices] unknown key 'dirr'"),
        ("[nonsense]\nx = 1\n", "unknown section [nonsense]"),
        ("[voices]\nmin_duration_s = 'long'\n", "[voices] min_duration_s: expected number, got str"),
        ("[voices]\nextensions = 'wav'\n", "[voices] extensions: expected list of string"),
        ("[cache]\nsize_limit_mb = true\n", "[cache] size_limit_mb: expected number, got bool"),
        ("[server]\nendpoints = ['http://x']\n", "[server] endpoints: 'http://x' is not tcp://"),
        ("[server]\nendpoints = ['ipc:///tmp/v.sock', 'tcp://127.0.0.1:1', 'ipc:///tmp/v.sock']\n",
         "[server] endpoints: 'ipc:///tmp/v.sock' is listed twice"),
        ("[server]\nqueue_size = 0\n", "[server] queue_size: must be positive"),
        ("[engine]\ndevice = 'gpu'\n", "[engine] device: must be auto, cpu, cuda or cuda:N"),
        ("[voices]\nobserver = 'fanotify'\n", "[voices] observer: must be one of auto, inotify, polling"),
        ("[voices]\nsettle_s = -1\n", "[voices] settle_s: must not be negative"),
        ("[voices]\npoll_interval_s = nan\n", "[voices] poll_interval_s: must be a finite number"),
        ("[engine]\nrefine_budget_s = inf\n", "[engine] refine_budget_s: must be a finite number"),
        ("[cache]\nsize_limit_mb = -inf\n", "[cache] size_limit_mb: must be a finite number"),
        ("[voices]\ndir = '/definitely/not/here'\n", "[voices] dir: folder does not exist: /definitely/not/here"),
        ("[cluster]\naddress = 'auto'\n", "[cluster] address: a cluster needs [cache] shared_dir"),
        ("[cluster]\nmin_replicas = 2\nmax_replicas = 1\n", "[cluster] max_replicas: smaller than min_replicas"),
        ("[cluster]\nrequests_per_replica = 0\n", "[cluster] requests_per_replica: must be positive"),
        ("[cluster]\npreparers = -1\n", "[cluster] preparers: must not be negative"),
        ("voices = 3\n", "[voices] must be a table"),
        ("[voices\n", "invalid TOML"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert fragment in message, message
    assert "\n" not in message


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_encodings_editors_write(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark and CRLF lines are read; Latin-1 text is one clear error."""
    path = tmp_path / "voiced.toml"
    path.write_bytes(b"\xef\xbb\xbf[log]\r\nlevel = 'warning'\r\n")
    assert load_config(path).log.level == "warning"
    path.write_bytes("[log]\n# r\u00e9glages\nlevel = 'warning'\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 0xe9 on line 2); TOML files are UTF-8"


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[log]\nlevel = 'warning'\n")
    monkeypatch.setenv("VOICED_CONFIG", str(path))
    assert load_config(None).log.level == "warning"


def test_rendered_toml_parses_back_to_the_same_values(tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    voices.mkdir()
    config = parse_config({"voices": {"dir": str(voices)}, "engine": {"options": {"speed": 1.2}}})
    again = parse_config(__import__("tomllib").loads(to_toml(config)))
    assert again == Config(**{**again.__dict__, "source": None})
    assert again.voices == config.voices and again.engine == config.engine


def test_example_config_documents_every_key() -> None:
    """config.example.toml is valid and mentions every key the loader knows."""
    import dataclasses
    import tomllib

    from voiced import config as cfg

    text = (REPO / "config.example.toml").read_text()
    raw = tomllib.loads(text)
    parse_config(raw, check_dirs=False)
    for section, cls in cfg._SECTIONS.items():
        assert f"[{section}]" in text, section
        for field in dataclasses.fields(cls):
            if (section, field.name) == ("plugins", "settings"):
                continue  # [plugins.NAME] tables, shown as commented examples
            assert f"{field.name} =" in text or f"# {field.name} =" in text, f"[{section}] {field.name}"


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voiced", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_check_config_command(tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    voices.mkdir()
    good = write(tmp_path, f"[voices]\ndir = '{voices}'\n")
    result = _run_cli("check-config", "--config", str(good), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["voices"]["dir"] == str(voices)
    assert data["source"] == str(good)

    text = _run_cli("check-config", "--config", str(good))
    assert text.returncode == 0 and f'dir = "{voices}"' in text.stdout

    # the file may also be given as an argument, as a first try would; two different files are refused
    text = _run_cli("check-config", str(good))
    assert text.returncode == 0 and f'dir = "{voices}"' in text.stdout and str(good) in text.stdout
    other = tmp_path / "other.toml"
    other.write_text("[log]\nlevel = 'debug'\n")
    result = _run_cli("check-config", str(good), "--config", str(other))
    assert result.returncode == 1 and "two config files given" in result.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text("[voices]\nmax_duration_s = 'x'\n")
    result = _run_cli("check-config", "--config", str(bad))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_duration_s" in lines[0] and str(bad) in lines[0]

    # engine options are checked too (the engine is built, not loaded)
    bad.write_text(f"[voices]\ndir = '{voices}'\n[engine]\noptions = {{ threads = -1 }}\n")
    result = _run_cli("check-config", "--config", str(bad))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[engine] options: threads must be a whole number" in lines[0] and str(bad) in lines[0]
