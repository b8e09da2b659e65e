"""Give Kokoro's ONNX graph a pitch input: a factor on the F0 curve its prosody predictor makes.

The exported graph takes tokens, a style and a speed. Its predictor computes an F0 curve
(``F0_proj``) that drives the decoder's harmonic source; scaling that curve moves the pitch
alone, rendered by the model itself, while the warp of post.py moves pitch and formants together.
Together they let a fitted voice have a long vocal tract and a high voice (or the reverse), which
the five base styles cannot express.

The edit is one Mul node and one graph input (``pitch``, float[1]), made with the ``onnx``
package once per model into the cache beside the verified join, with its own digest. It runs in
a child process: parsing 92 MB of protobuf costs a few hundred MB of memory that a long-running
daemon would otherwise keep. A model without the F0 tensor (another export) is served unedited,
without pitch control.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from voiced.engines.base import EngineError
from voiced.fsutil import digest_matches, write_with_digest

log = logging.getLogger(__name__)

PITCH_INPUT = "pitch"
F0_TENSOR = "/encoder/F0_proj/Conv_output_0"
EDIT_VERSION = "pitch1"  # part of the edited file's name: bump when the edit changes
_NOTHING_TO_EDIT = 3  # the child's exit status when the graph has no F0 tensor
_SPARE_BYTES = 16 << 20  # beyond the model's own size, before the edit is tried


def pitched_model(path: Path) -> Path | None:
    """The model at ``path`` with a pitch input, built beside it on first use; None without F0.

    The edited file is trusted only while it matches the digest written after it, so a crash
    mid-write or a damaged file means a rebuild, never a broken session.
    """
    out = path.with_name(f"{path.stem}-{EDIT_VERSION}.onnx")
    if digest_matches(out):
        return out
    # A full cache disk would fail the edit only after the child has parsed the whole model,
    # at every start: say so at once instead.
    need = path.stat().st_size + _SPARE_BYTES
    free = shutil.disk_usage(out.parent).free + (out.stat().st_size if out.is_file() else 0)
    if free < need:
        raise EngineError(f"not enough free space for the pitch-edited model in {out.parent}: "
                          f"{free >> 20} MiB free, {need >> 20} MiB needed")
    log.info("adding a pitch input to the Kokoro model: %s", out)
    proc = subprocess.run([sys.executable, "-m", __name__, str(path), str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode == _NOTHING_TO_EDIT:
        log.warning("Kokoro model has no %s tensor: voices are served without pitch control", F0_TENSOR)
        return None
    if proc.returncode != 0:
        raise EngineError(f"cannot add a pitch input to the Kokoro model: {proc.stderr.strip()[-500:]}")
    return out


def edit(src: Path, dst: Path) -> bool:
    """Write ``src`` with the pitch input to ``dst`` (atomically, then its digest); False if no F0."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    producer = next((k for k, n in enumerate(graph.node) if F0_TENSOR in n.output), None)
    consumers = [n for n in graph.node if F0_TENSOR in n.input]
    if producer is None or not consumers or any(i.name == PITCH_INPUT for i in graph.input):
        return False
    scaled = F0_TENSOR + "_pitched"
    for node in consumers:
        for i, name in enumerate(node.input):
            if name == F0_TENSOR:
                node.input[i] = scaled
    # right after its producer, so the node list stays in topological order
    graph.node.insert(producer + 1, helper.make_node("Mul", [F0_TENSOR, PITCH_INPUT], [scaled], name="voiced_pitch"))
    graph.input.append(helper.make_tensor_value_info(PITCH_INPUT, TensorProto.FLOAT, [1]))
    data = model.SerializeToString()
    write_with_digest(dst, data)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m voiced.engines.kokoro.graph SRC.onnx DST.onnx", file=sys.stderr)
        return 2
    return 0 if edit(Path(argv[0]), Path(argv[1])) else _NOTHING_TO_EDIT


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


__all__ = ["EDIT_VERSION", "F0_TENSOR", "PITCH_INPUT", "edit", "pitched_model"]
