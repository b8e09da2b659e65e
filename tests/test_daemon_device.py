"""The daemon on whatever device the machine has: with ``device = "auto"`` a CUDA machine embeds
voices on the GPU, a machine without one on the CPU, and the embeddings agree with the CPU's.

The engine here is the tests' weightless one (a tone per request, ``tests/fake_engines``), so the
check covers the daemon's own device path, the speaker encoder's, on any machine, without the
Kokoro weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from fakes import FAKE_ENGINES

from voiced.config import load_config
from voiced.embedding import embed_files
from voiced.encoder import SpeakerEncoder, cosine
from voiced.testing import DaemonProcess


def test_voices_are_embedded_on_the_machines_device(tmp_path: Path, testdata_dir: Path) -> None:
    settings = {"engine": {"name": "tone"}, "encoder": {"device": "auto"}, "plugins": {"paths": [FAKE_ENGINES]}}
    clips = [testdata_dir / "voices" / name for name in ("carlo_a.wav", "june_b.wav")]
    with DaemonProcess(tmp_path, settings).start() as daemon:
        for clip in clips:
            shutil.copyfile(clip, daemon.voices / clip.name)
        for clip in clips:
            daemon.wait_ready(clip.stem)
        with daemon.client() as client:
            status = client.status()
            reply = client.synthesize("On the device.", voice="carlo_a", format="pcm_f32le")
        assert len(reply.audio) > 0
        # what the daemon stored, read back from its cache
        results = embed_files([daemon.voices / clip.name for clip in clips], load_config(daemon.config))
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert status["encoder"]["device"].split(":")[0] == want, status["encoder"]
    cpu = SpeakerEncoder(device="cpu", precision="fp32")
    for clip, result in zip(clips, results):
        assert result.error is None and result.cached, result
        assert cosine(result.embedding, cpu.embed_file(clip)) > 0.999  # bf16 on CPUs that have it: >= 0.9999
        assert np.isclose(np.linalg.norm(result.embedding), 1.0, atol=1e-5)
