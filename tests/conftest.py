"""Shared fixtures: test data location and one speaker encoder per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

TESTDATA = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).parents[1].parent / "shared" / "testdata")


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
    """/work/shared/testdata (or $VOICED_TESTDATA); skips when absent."""
    if not (TESTDATA / "voices").is_dir():
        pytest.skip(f"test data not found at {TESTDATA} (set VOICED_TESTDATA)")
    return TESTDATA


@pytest.fixture(scope="session")
def golden(testdata_dir: Path) -> dict[str, Any]:
    """Reference embeddings from resemblyzer 0.1.4, keyed by file name."""
    with open(testdata_dir / "golden-resemblyzer.json", encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def speaker_encoder() -> Any:
    """The GE2E encoder on CPU, loaded once per session (weights must be installed)."""
    from voiced.encoder import SpeakerEncoder

    return SpeakerEncoder(device="cpu")
