"""A replica's preparation stream, in this process (no cluster): what the front door reads."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes import FAKE_ENGINES

pytest.importorskip("ray", reason="cluster mode needs the cluster extra (Ray Serve)")

sys.path.insert(0, str(FAKE_ENGINES))
from tone import tone_pitch  # noqa: E402
from voiced.cluster.replica import Replica  # noqa: E402


def preparer(tmp_path: Path, refine_s: float) -> Replica:
    config = {"engine": {"name": "tone", "options": {"refine_s": refine_s}},
              "plugins": {"paths": [str(FAKE_ENGINES)]}, "cache": {"dir": str(tmp_path / "cache")}}
    replica = Replica(config, None, prepares=True)
    assert replica.producer == "tone@1"
    return replica


def embedding(peak: int) -> np.ndarray:
    e = np.zeros(256, np.float32)
    e[peak] = 1.0
    return e


async def events(replica: Replica, stage: str, stoppable: bool = True, take: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    stream = replica.prepare(np.zeros(16000, np.float32), embedding(64), stage, None, None, stoppable)
    async for event in stream:
        out.append(event)
        if take is not None and len(out) >= take:
            await stream.aclose()  # what cancelling the stream does to the generator
            break
    return out


def test_a_stage_streams_its_progress_then_its_result(tmp_path: Path) -> None:
    replica = preparer(tmp_path, refine_s=0.5)
    got = asyncio.run(events(replica, "refined"))
    progress = [e["progress"] for e in got[:-1] if e["progress"] is not None]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) == replica.engine.REFINE_STEPS  # type: ignore[attr-defined]
    assert all("progress" in e for e in got[:-1])
    result = got[-1]
    assert float(result["arrays"]["pitch"][0]) == pytest.approx(tone_pitch(embedding(64)))
    assert result["meta"]["stage"] == "refined"
    assert replica.engine.stopped_at is None  # type: ignore[attr-defined]


def test_a_stage_called_off_stops_the_engine(tmp_path: Path) -> None:
    replica = preparer(tmp_path, refine_s=30.0)  # ten 3 s steps: it is still at it when called off
    got = asyncio.run(events(replica, "refined", take=1))
    assert got == [{"progress": None}]  # a heartbeat before the first step is done
    deadline = time.monotonic() + 60
    while replica.engine.stopped_at is None and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    assert replica.engine.stopped_at == 1  # type: ignore[attr-defined]  # it gave way at its next step


def test_the_first_stage_has_no_progress_to_tell(tmp_path: Path) -> None:
    got = asyncio.run(events(preparer(tmp_path, refine_s=0.5), "ready", stoppable=False))
    assert [set(e) for e in got] == [{"arrays", "meta"}]
