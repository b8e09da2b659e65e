"""The reliability suite: crash safety, faults, hostile input, load. All of it is marked slow.

Run it alone with ``python -m pytest -m slow tests/reliability``; it ends with one table
(what was tried, what held, data lost), also written as JSON to ``$VOICED_RELIABILITY_REPORT``
when that is set.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf


@dataclass
class Row:
    check: str
    tried: int = 0
    held: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


class Report:
    """What each reliability test tried and how it went; printed as one table at the end."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def row(self, check: str) -> Row:
        return self.rows.setdefault(check, Row(check))

    def table(self) -> str:
        lines = [
            "| check | tried | held | data lost | notes |",
            "|---|---:|---:|---:|---|",
        ]
        for r in self.rows.values():
            lines.append(f"| {r.check} | {r.tried} | {r.held} | {r.lost} | {'; '.join(r.notes)} |")
        return "\n".join(lines)


REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT.rows:
        return
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line(REPORT.table())
    target = os.environ.get("VOICED_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps([asdict(r) for r in REPORT.rows.values()], indent=2))


# ---------------------------------------------------------------------------- voice files


class ClipMaker:
    """Distinct reference recordings cut from the test speakers (seeded: same seed, same files)."""

    def __init__(self, testdata_dir: Path) -> None:
        self.sources: list[tuple[np.ndarray, int]] = []
        for path in sorted((testdata_dir / "voices").iterdir()):
            audio, rate = sf.read(path, dtype="float32")
            self.sources.append((audio, rate))

    def write(self, path: Path, rng: np.random.Generator, seconds: tuple[float, float] = (2.0, 4.0)) -> Path:
        audio, rate = self.sources[int(rng.integers(len(self.sources)))]
        length = int(rng.uniform(*seconds) * rate)
        start = int(rng.integers(0, len(audio) - length))
        clip = audio[start : start + length] * float(rng.uniform(0.4, 1.0))
        tmp = path.with_name(f".{path.name}.part")  # hidden: the daemon ignores it until the rename
        sf.write(tmp, clip, rate, format="WAV", subtype="PCM_16")
        os.replace(tmp, path)
        return path


@pytest.fixture(scope="session")
def clip_maker(testdata_dir: Path) -> ClipMaker:
    return ClipMaker(testdata_dir)
