"""Cluster mode's front door without a cluster: what a user sees when cluster mode cannot start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from voiced.cluster import ClusterEngine
from voiced.config import parse_config
from voiced.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent / "fake_engines"))
from tone import ToneEngine  # noqa: E402


def test_without_ray_the_error_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"cache": {"shared_dir": str(tmp_path)}, "cluster": {"address": "auto"}}, check_dirs=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without the cluster extra
    engine = ClusterEngine(ToneEngine(), config)
    with pytest.raises(ConfigError, match=r"needs Ray Serve: pip install 'voiced\[cluster\]'"):
        engine.start()
    assert engine.sample_rate == 16000 and engine.stages == ("ready",)  # the rest is the local engine's
