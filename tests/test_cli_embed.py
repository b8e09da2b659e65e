"""`voiced embed`: embeddings of files without a daemon, through the shared cache."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
import threading
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


def test_embed_shows_a_bar_on_a_terminal_only(tmp_path: Path, testdata_dir: Path) -> None:
    files = [str(testdata_dir / "voices" / name) for name in ("allison_a.wav", "june_a.wav")]
    piped = embed(tmp_path, *files)
    assert piped.returncode == 0 and piped.stderr == "" and len(piped.stdout.splitlines()) == 2
    # stderr on a terminal (a pseudo-terminal 100 columns wide): the bar, and the same stdout
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    config = tmp_path / "voiced.toml"
    proc = subprocess.Popen([sys.executable, "-m", "voiced", "embed", "--config", str(config), *files],
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    terminal = bytearray()
    reader = threading.Thread(target=lambda: _drain(master, terminal), daemon=True)
    reader.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    assert proc.wait(120) == 0
    reader.join(10)
    os.close(master)
    assert out == piped.stdout
    assert b"0/2 [" in terminal and b"file" in terminal, bytes(terminal)  # drawn at once, whatever the speed


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal's other end closed
            return
        if not chunk:
            return
        into.extend(chunk)
