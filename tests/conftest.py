"""Shared fixtures: test data location, one speaker encoder per test session, Kokoro's derived
model files made once."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def kokoro_models(tmp_path_factory: pytest.TempPathFactory, speaker_encoder: Any) -> Callable[[Path], Path]:
    """``seed(folder)``: copies into ``folder`` Kokoro's files derived once per session (the joined
    graph, its pitch input, the torch weights, the base voices' calibration speech for both fits),
    so that an engine or daemon made there starts warm, as on any start after a daemon's first.

    Making them costs 10-15 s per engine; the tests of how they are made (and remade when
    damaged) use folders of their own, or damage only their copy. A daemon's models folder is
    ``<cache>/models``.
    """
    from voiced.engines.kokoro import KokoroEngine

    warm = tmp_path_factory.mktemp("kokoro-models")
    for backend, fit in (("onnx", "search"), ("torch", "search"), ("torch", "gradient")):
        engine = KokoroEngine(warm, backend=backend, fit=fit, encoder=speaker_encoder)
        engine.load("cpu")
        engine.fitter()

    def seed(folder: Path) -> Path:
        folder = Path(folder)
        shutil.copytree(warm, folder, dirs_exist_ok=True)  # copies: a test may damage its own
        return folder

    return seed
