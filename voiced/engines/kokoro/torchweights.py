"""Kokoro's float32 weights for the torch network, recovered from the shipped int8 ONNX graph.

The only weights that install offline are the int8 graph's, so the torch backend reads them out
of it once: every quantised tensor is dequantised (``(q - zero_point) * scale``), weight-normed
layers come already folded, LSTM gates are reordered from ONNX's (i, o, f, c) to torch's
(i, f, g, o). The result is written as safetensors in the models folder, named after the graph's
sha256: a second start loads it in well under a second, and a file that does not match the
digest written beside it (a crash mid-write, a damaged disk) is rebuilt.

Reading the graph costs a few hundred MB of protobuf, so the extraction runs in a child process
(``python -m voiced.engines.kokoro.torchweights SRC DST``); the daemon only maps the result.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from voiced.engines.base import EngineError
from voiced.fsutil import digest_matches, write_with_digest

log = logging.getLogger(__name__)

EXTRACT_VERSION = "w1"  # part of the file's name: bump when the extraction changes


# ----------------------------------------------------------------------------- names


def _scope_key(node_name: str) -> str:
    """The parameter prefix of the layer a graph node belongs to.

    ``/decoder/decoder/generator/resblocks.4/adain2.2/fc/Gemm_MatMul_quant`` ->
    ``decoder.generator.resblocks.4.adain2.2.fc``. The exporter names a Sequential's child after
    its parent (``cnn.0/cnn.0.0``), puts the predictor's F0/N branch and shared LSTM directly
    under ``/encoder/`` and numbers the unrolled ALBERT layer's copies (``attention_3``).
    """
    parts = node_name.strip("/").split("/")[:-1]  # the last part names the op itself
    root, parts = parts[0], parts[1:]
    if root == "decoder" and parts and parts[0] == "decoder":
        parts = ["decoder", *parts[1:]]
    elif root == "encoder" and parts and re.match(r"^(F0|N)(\.\d+|_proj)$|^shared$", parts[0]):
        parts = ["predictor", *parts]
    out: list[str] = []
    for part in parts:
        if out and part.startswith(out[-1] + "."):
            out[-1] = part
        else:
            out.append(part)
    key = ".".join(out)
    if key.startswith("bert."):
        key = re.sub(r"_\d+(?=\.|$)", "", key)  # the unrolled copies of the one shared layer
    return key


def _named_key(initializer: str) -> str | None:
    """The parameter an fp32 initializer stands for, when the exporter kept its name."""
    if initializer.startswith("decoder.decoder."):
        return "decoder." + initializer[len("decoder.decoder."):]
    if initializer.startswith("encoder."):
        return initializer[len("encoder."):]
    return None


def _gates(w: np.ndarray, hidden: int) -> np.ndarray:
    """ONNX LSTM gate blocks (i, o, f, c) along axis 0 -> torch's (i, f, g, o)."""
    i, o, f, c = (w[k * hidden:(k + 1) * hidden] for k in range(4))
    return np.concatenate([i, f, c, o], axis=0)


# ----------------------------------------------------------------------------- extraction


def extract(model_path: str | Path) -> dict[str, np.ndarray]:
    """Every float32 parameter of the torch network, by name, from the int8 graph at ``model_path``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray) -> None:
        out.setdefault(key, np.ascontiguousarray(value, dtype=np.float32))

    for name, value in inits.items():
        key = _named_key(name)
        if key is not None and value.dtype == np.float32 and not key.endswith(("_scale", "inverse_basis")):
            put(key, value)

    def scale_of(quantized: str) -> np.ndarray:
        base = quantized[: -len("_quantized")] if quantized.endswith("_quantized") else quantized
        return inits[base + "_scale"].astype(np.float32)

    for node in model.graph.node:
        op, ins = node.op_type, list(node.input)
        if op == "MatMulInteger" and ins[1] in inits:
            # weights [in, out] with a scale and zero point per output column; the zero point
            # comes from the node (the exporter shares zero-point tensors between layers)
            q = inits[ins[1]].astype(np.float32)
            zero = inits[ins[3]].astype(np.float32) if len(ins) > 3 and ins[3] else 0.0
            put(_scope_key(node.name) + ".weight", ((q - zero) * scale_of(ins[1])).T)
        elif op == "ConvInteger" and ins[1] in inits:
            q = inits[ins[1]].astype(np.float32)
            zero = inits[ins[3]].astype(np.float32) if len(ins) > 3 and ins[3] else 0.0
            put(_scope_key(node.name) + ".weight", (q - zero) * scale_of(ins[1]))
        elif op in ("ConvTranspose", "Conv") and "istft" not in node.name:
            put(_scope_key(node.name) + ".weight", inits[ins[1]])
        elif op == "MatMul" and len(ins) > 1 and ins[1] in inits:  # the source's l_linear
            put(_scope_key(node.name) + ".weight", inits[ins[1]].T)
        elif op == "Gather" and node.name.endswith("Gather_quant"):
            dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0])
            q = inits[ins[0]].astype(np.float32)
            put(_scope_key(node.name) + ".weight", (q - inits[dq.input[2]].astype(np.float32)) * inits[dq.input[1]])
        elif op == "DynamicQuantizeLSTM":
            key = _scope_key(node.name)
            hidden = next(a.i for a in node.attribute if a.name == "hidden_size")
            w, r, b = (inits[x] for x in ins[1:4])
            w_scale, w_zero, r_scale, r_zero = (inits[x].astype(np.float32) for x in ins[8:12])
            for d, suffix in enumerate(("", "_reverse")):
                wf = (w[d].astype(np.float32) - w_zero.reshape(-1)[d]) * w_scale.reshape(-1)[d]
                rf = (r[d].astype(np.float32) - r_zero.reshape(-1)[d]) * r_scale.reshape(-1)[d]
                put(f"{key}.weight_ih_l0{suffix}", _gates(wf.T, hidden))
                put(f"{key}.weight_hh_l0{suffix}", _gates(rf.T, hidden))
                put(f"{key}.bias_ih_l0{suffix}", _gates(b[d][: 4 * hidden], hidden))
                put(f"{key}.bias_hh_l0{suffix}", _gates(b[d][4 * hidden:], hidden))
    return out


def check(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise EngineError unless ``state`` has exactly the expected parameters and shapes."""
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
    if missing or wrong:
        detail = [f"missing {missing[:5]}" if missing else "", f"mis-shaped {wrong[:5]}" if wrong else ""]
        raise EngineError("the Kokoro graph's weights do not fit the torch network: " + "; ".join(d for d in detail if d))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    from voiced.engines.kokoro.torchnet import KokoroNet

    return {k: tuple(v.shape) for k, v in KokoroNet().state_dict().items()}


def write(model_path: Path, out: Path) -> None:
    """Extract, check and write the safetensors file atomically, then its digest."""
    from safetensors.numpy import save

    state = extract(model_path)
    shapes = expected_shapes()
    check(state, shapes)
    data = save({k: state[k] for k in sorted(shapes)}, metadata={"source": model_path.name})
    write_with_digest(out, data)


# ----------------------------------------------------------------------------- the cache


def cached_weights(model_path: Path, graph_sha256: str) -> Path:
    """The safetensors file for the graph with digest ``graph_sha256``, extracted on first use."""
    out = model_path.with_name(f"kokoro-v1.0-fp32-{graph_sha256[:16]}-{EXTRACT_VERSION}.safetensors")
    if digest_matches(out):
        return out
    if out.is_file():
        log.warning("cached torch weights %s do not match their digest; rebuilding them", out)
    log.info("extracting float32 weights for the torch backend from %s (once per model)", model_path.name)
    proc = subprocess.run([sys.executable, "-m", __name__, str(model_path), str(out)], capture_output=True,
                          text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise EngineError(f"cannot extract the Kokoro weights for torch: {proc.stderr.strip()[-800:]}")
    return out


def load_state(path: Path) -> dict[str, "object"]:
    """The torch state dict in the safetensors file at ``path``."""
    from safetensors.torch import load_file

    return load_file(str(path))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m voiced.engines.kokoro.torchweights SRC.onnx DST.safetensors", file=sys.stderr)
        return 2
    write(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


__all__ = ["EXTRACT_VERSION", "cached_weights", "check", "expected_shapes", "extract", "load_state"]
