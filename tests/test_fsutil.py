"""The shared filesystem helpers: durable writes, trusted derived files, safe npz reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from voiced.fsutil import DIGEST_SUFFIX, atomic_write, atomic_writer, digest_matches, read_npz, sha256_file, write_with_digest


def test_atomic_writer_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("the source went away")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # no temporary left behind
    with atomic_writer(target, tmp_prefix=".model-") as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_a_derived_file_is_trusted_only_while_its_digest_matches(tmp_path: Path) -> None:
    out = tmp_path / "derived.onnx"
    assert not digest_matches(out)  # nothing yet
    write_with_digest(out, b"graph bytes")
    digest = out.with_name(out.name + DIGEST_SUFFIX)
    assert digest.read_text(encoding="ascii") == hashlib.sha256(b"graph bytes").hexdigest() == sha256_file(out)
    assert digest_matches(out)
    out.write_bytes(b"graph bytez")  # damaged on disk
    assert not digest_matches(out)
    write_with_digest(out, b"graph bytes")
    digest.unlink()  # a crash between the file and its digest
    assert not digest_matches(out)


def test_read_npz_never_unpickles(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, a=np.arange(3, dtype=np.float32))
    np.savez(bad, a=np.array([{"code": "run me"}], dtype=object))
    assert read_npz(good)["a"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        read_npz(bad)
