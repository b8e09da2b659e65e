"""`voiced embed`: embeddings of files without a daemon, through the shared cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def embed(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "voiced.toml"
    config.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n')
    return subprocess.run(
        [sys.executable, "-m", "voiced", "embed", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )


def test_embed_json_matches_the_reference_and_uses_the_cache(
    tmp_path: Path, testdata_dir: Path, golden: dict[str, Any]
) -> None:
    files = [testdata_dir / "voices" / name for name in ("allison_a.wav", "carlo_b.ogg")]
    first = embed(tmp_path, "--json", *map(str, files))
    assert first.returncode == 0, first.stderr
    results = json.loads(first.stdout)["embeddings"]
    assert [r["cached"] for r in results] == [False, False]
    for result, file in zip(results, files):
        vec = np.asarray(result["embedding"])
        assert vec.shape == (256,)
        assert float(vec @ np.asarray(golden[file.name]["pipeline"])) > 0.99
    again = json.loads(embed(tmp_path, "--json", *map(str, files)).stdout)["embeddings"]
    assert [r["cached"] for r in again] == [True, True]
    assert again[0]["embedding"] == results[0]["embedding"]


def test_embed_text_output_and_errors(tmp_path: Path, testdata_dir: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 100)
    good = testdata_dir / "voices" / "june_a.wav"
    result = embed(tmp_path, str(good), str(bad), str(tmp_path / "missing.wav"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{good}\t")
    assert len(lines[0].split("\t")[1].split()) == 256
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert str(bad) in errors[0] and "missing.wav: no such file" in errors[1]
