"""Cluster mode on a real Ray cluster of two nodes on this machine (ray's own cluster test
utilities), the daemon as its front door, the weightless tone engine in the replicas."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes import FAKE_ENGINES, tone_of, tone_voices
from voiced.testing import DaemonProcess

ray = pytest.importorskip("ray", reason="cluster mode needs the cluster extra (Ray Serve)")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SENTENCE_S = 0.4  # each sentence takes this long in a replica: a request stays in flight


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="voiced", log_to_driver=False)
    c.worker = worker
    yield c
    ray.shutdown()
    c.shutdown()


def front_door(root: Path, address: str, refine_s: float = 0.0, **cluster: Any) -> DaemonProcess:
    (root / "share").mkdir(parents=True, exist_ok=True)
    settings = {
        "engine": {"name": "tone", "options": {"sentence_s": SENTENCE_S, "refine_s": refine_s}},
        "plugins": {"paths": [FAKE_ENGINES]},
        "cache": {"shared_dir": root / "share"},
        # the preparer reserves no CPU: it fits beside the synthesis replicas on either node
        "cluster": {"address": address, "min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5,
                    "preparer_num_cpus": 0, "app_name": root.name, **cluster},
    }
    return DaemonProcess(root, settings)


def replicas(app: str, deployment: str = "synthesizer") -> list[str]:
    """The names of the replica actors of one of the daemon's Serve deployments."""
    if deployment == "preparer":
        app = f"{app}-prepare"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]


def kill_replicas(app: str, deployment: str = "synthesizer") -> None:
    names = replicas(app, deployment)
    assert names, f"no {deployment} replica of {app} to kill"
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)


def test_requests_are_spoken_by_the_replicas(cluster: Any, tmp_path: Path, testdata_dir: Path) -> None:
    with front_door(tmp_path / "front", cluster.address).start(wait=False) as d:
        d.wait_answering(300)
        tones = tone_voices(d, testdata_dir / "voices", ("carlo_a", "june_b"))
        with d.client() as client:
            status = client.status()
            reply = client.synthesize("One. Two. Three.", voice="june_b", format="pcm_s16le")
        assert status["cluster"]["replicas"] == [2, 2] and status["cluster"]["lost"] == 0
        assert len(replicas("front")) == 2
        assert abs(tone_of(reply.audio, 16000) - tones["june_b"]) < 5
        assert len(reply.audio) // 2 == sum(int(0.05 * len(s) * 16000) for s in ("One", "Two", "Three."))
        assert "cluster ready" in d.log_tail(50_000)


def test_a_replica_killed_mid_request_costs_nothing(cluster: Any, tmp_path: Path, testdata_dir: Path) -> None:
    with front_door(tmp_path / "kill", cluster.address).start(wait=False) as d:
        d.wait_answering(300)
        tone_voices(d, testdata_dir / "voices", ("carlo_a", "june_b"))
        text = ". ".join(f"Sentence number {i}" for i in range(10)) + "."
        with d.client() as client:
            whole = client.synthesize(text, voice="carlo_a", format="pcm_s16le").audio
        got: dict[str, Any] = {}

        def ask() -> None:
            with d.client(timeout_s=120) as client:
                got["chunks"] = [m.audio for m in client.stream(text, voice="carlo_a", format="pcm_s16le")]

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(3 * SENTENCE_S)  # some sentences sent
        kill_replicas("kill")
        t.join(120)
        assert b"".join(got["chunks"]) == whole  # every sentence once, in order
        with d.client() as client:
            assert client.status()["cluster"]["retried"] == 1
            # and the front door goes on serving
            assert client.synthesize("After.", voice="june_b", format="pcm_s16le").audio


def test_no_replica_left_is_a_clear_error(cluster: Any, tmp_path: Path, testdata_dir: Path) -> None:
    from voiced.client import RequestError

    with front_door(tmp_path / "gone", cluster.address, retries=0).start(wait=False) as d:
        d.wait_answering(300)
        tone_voices(d, testdata_dir / "voices", ("carlo_a", "june_b"))
        errors: list[Exception] = []

        def ask() -> None:
            try:
                with d.client(timeout_s=120) as client:
                    client.synthesize(". ".join(["Long sentence"] * 20), voice="carlo_a", format="pcm_s16le")
            except RequestError as exc:
                errors.append(exc)

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(3 * SENTENCE_S)
        kill_replicas("gone")
        t.join(120)
        assert len(errors) == 1 and errors[0].code == "internal" and "lost this request" in str(errors[0])
        with d.client() as client:
            assert client.ping()["protocol"] == 1


def test_a_node_lost_mid_request_costs_nothing(cluster: Any, tmp_path: Path, testdata_dir: Path) -> None:
    """The worker node goes (its raylet and every process on it) while eight requests run on
    both replicas: every reply comes whole, the lost ones run again on the head's replica."""
    # a CPU a replica: one fits on each node, so one replica is on the worker
    with front_door(tmp_path / "node", cluster.address, num_cpus=1.0).start(wait=False) as d:
        d.wait_answering(300)
        tone_voices(d, testdata_dir / "voices", ("carlo_a", "june_b"))
        text = ". ".join(f"Sentence number {i}" for i in range(8)) + "."
        with d.client() as client:
            whole = {v: client.synthesize(text, voice=v, format="pcm_s16le").audio for v in ("carlo_a", "june_b")}
        got: list[tuple[str, bytes]] = []

        def ask(voice: str) -> None:
            with d.client(timeout_s=120) as client:
                got.append((voice, b"".join(m.audio for m in client.stream(text, voice=voice, format="pcm_s16le"))))

        # eight at once, four a replica at most: the replica holding a voice fills, the rest go to the other
        threads = [threading.Thread(target=ask, args=(("carlo_a", "june_b")[k % 2],)) for k in range(8)]
        for t in threads:
            t.start()
        time.sleep(3 * SENTENCE_S)
        cluster.remove_node(cluster.worker)
        for t in threads:
            t.join(180)
        cluster.worker = cluster.add_node(num_cpus=1)
        assert len(got) == 8 and all(audio == whole[voice] for voice, audio in got)
        with d.client() as client:
            status = client.status()["cluster"]
        assert status["retried"] >= 1 and status["lost"] == 0, status


def test_a_preparer_killed_mid_stage_prepares_it_again(cluster: Any, tmp_path: Path, testdata_dir: Path) -> None:
    """The refined stage runs on the preparation replica, reporting progress; the replica dies
    halfway and the stage runs again on its replacement: the voice gets there all the same."""
    with front_door(tmp_path / "prep", cluster.address, refine_s=4.0).start(wait=False) as d:
        d.wait_answering(300)
        shutil.copyfile(testdata_dir / "voices" / "carlo_a.wav", d.voices / "carlo_a.wav")
        d.wait_voice("carlo_a", lambda v: v is not None and (v.get("progress") or {}).get("done", 0) >= 0.3)
        assert len(replicas("prep", "preparer")) == 1
        kill_replicas("prep", "preparer")
        d.wait_ready("carlo_a", stage="refined")
        with d.client() as client:
            status = client.status()["cluster"]
            assert status["stages_retried"] == 1 and status["stages_lost"] == 0, status
            assert client.synthesize("Refined.", voice="carlo_a", format="pcm_s16le").audio
        assert "lost mid-stage refined" in d.log_tail(50_000)
