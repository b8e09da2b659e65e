"""The two runtimes that can run Kokoro: onnxruntime on the int8 graph, or torch on its weights.

Both take one utterance's token ids (without the pad tokens), its style row (1, 256), a speed and
a pitch factor, and return float32 audio at 24 kHz. The engine chooses one with its ``backend``
option; everything else (text, voices, fitting, post-processing) is shared.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from voiced.engines.base import EngineError
from voiced.engines.kokoro import graph

log = logging.getLogger(__name__)

BACKENDS = ("onnx", "torch")
_MODEL_INPUTS = {"tokens", "style", "speed"}


class Backend(Protocol):
    name: str
    device: str  # "cpu" or "cuda:N", as resolved at load
    pitch_control: bool  # whether the pitch factor reaches the model's F0

    def run(self, tokens: list[int], style: np.ndarray, speed: float, pitch: float) -> np.ndarray: ...

    def release(self, tokens: list[int], style: np.ndarray) -> None:
        """Give back memory grown for long inputs (``tokens``/``style``: a short input to run)."""


# ----------------------------------------------------------------------------- onnxruntime


def _onnx_providers(device: str) -> tuple[list[Any], str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    dev = (device or "auto").strip().lower()
    if dev == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if dev == "auto" or dev == "cuda" or dev.startswith("cuda:"):
        index = 0
        if dev.startswith("cuda:"):
            try:
                index = int(dev.split(":", 1)[1])
            except ValueError as exc:
                raise EngineError(f"bad device {device!r}: expected cpu, cuda, cuda:N or auto") from exc
        if "CUDAExecutionProvider" in available:
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"
        if dev != "auto":
            raise EngineError(f"device {device!r} requested but onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        return ["CPUExecutionProvider"], "cpu"
    raise EngineError(f"bad device {device!r}: expected cpu, cuda, cuda:N or auto")


class OnnxBackend:
    """The int8 graph in onnxruntime, with the pitch input added (graph.py) when it can be."""

    name = "onnx"

    def __init__(self, model: Path, device: str, threads: int | None) -> None:
        import onnxruntime as ort

        providers, resolved = _onnx_providers(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        # idle intra-op threads would spin for a while after each call, taking the CPU from the
        # thread serving the socket and from voice preparation on small machines
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = model
        try:
            path = graph.pitched_model(model) or model
        except (EngineError, OSError, subprocess.SubprocessError) as exc:  # the model still speaks, at its own pitch
            log.warning("serving the Kokoro model without pitch control: %s", exc)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types; a corrupt file lands here
            raise EngineError(f"cannot load the Kokoro model {path}: {exc}") from exc
        self.device = resolved if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        names = {i.name for i in self.session.get_inputs()}
        if names not in (_MODEL_INPUTS, _MODEL_INPUTS | {graph.PITCH_INPUT}):
            raise EngineError(f"unexpected Kokoro model inputs {sorted(names)}")
        self.pitch_control = graph.PITCH_INPUT in names

    def feeds(self, tokens: list[int], style: np.ndarray, speed: float, pitch: float) -> dict[str, np.ndarray]:
        feeds = {
            "tokens": np.asarray([[0, *tokens, 0]], dtype=np.int64),
            "style": np.ascontiguousarray(style, dtype=np.float32).reshape(1, -1),
            "speed": np.asarray([speed], dtype=np.float32),
        }
        if self.pitch_control:
            feeds[graph.PITCH_INPUT] = np.asarray([pitch], dtype=np.float32)
        return feeds

    def run(self, tokens: list[int], style: np.ndarray, speed: float, pitch: float) -> np.ndarray:
        return np.asarray(self.session.run(None, self.feeds(tokens, style, speed, pitch))[0], dtype=np.float32)

    def release(self, tokens: list[int], style: np.ndarray) -> None:
        """onnxruntime keeps the arena it grew for the longest input: one short call, asking the CPU
        arena to shrink as it ends, frees what no running call holds."""
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.session.run(None, self.feeds(tokens, style, 1.0, 1.0), options)


# ----------------------------------------------------------------------------- batching

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Call(Generic[T, R]):
    item: T
    done: bool = False
    result: R | None = None
    error: BaseException | None = None
    event: threading.Event = field(default_factory=threading.Event)


class Batcher(Generic[T, R]):
    """Runs calls made at the same time from several threads as one batch.

    No call waits for company: a call that finds the model idle runs at once (a batch of one).
    Calls that arrive while a batch runs wait for it, and the next batch takes them all (up to
    ``max_batch``, oldest first). The caller whose call is oldest runs it, so there is no thread of
    its own to start or stop. If a batch fails, its items run again one by one, so one bad item
    cannot fail the others; each caller gets its own result or its own exception.
    """

    def __init__(self, run_batch: Callable[[Sequence[T]], Sequence[R]], max_batch: int) -> None:
        self._run_batch = run_batch
        self.max_batch = max(1, int(max_batch))
        self._lock = threading.Lock()
        self._pending: list[_Call[T, R]] = []
        self._busy = False
        self.batches = 0  # batches run, and the items in them: for benchmarks and tests
        self.items = 0

    def __call__(self, item: T) -> R:
        call: _Call[T, R] = _Call(item)
        with self._lock:
            self._pending.append(call)
        while True:
            with self._lock:
                if call.done:
                    break
                lead = not self._busy
                if lead:
                    self._busy = True
                    batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            if lead:
                try:
                    self._run(batch)
                finally:
                    with self._lock:
                        self._busy = False
                        waiting = list(self._pending)
                    for other in waiting:  # one of them leads the next batch
                        other.event.set()
                continue
            call.event.wait()
            call.event.clear()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _run(self, batch: list[_Call[T, R]]) -> None:
        try:
            results = list(self._run_batch([c.item for c in batch]))
            outcomes: list[tuple[R | None, BaseException | None]] = [(r, None) for r in results]
        except Exception as exc:  # noqa: BLE001 - isolate the item that failed
            if len(batch) == 1:
                outcomes = [(None, exc)]
            else:
                outcomes = []
                for c in batch:
                    try:
                        outcomes.append((self._run_batch([c.item])[0], None))
                    except Exception as one:  # noqa: BLE001 - handed to its own caller
                        outcomes.append((None, one))
        with self._lock:
            self.batches += 1
            self.items += len(batch)
            for c, (result, error) in zip(batch, outcomes):
                c.result, c.error, c.done = result, error, True
        for c in batch:
            c.event.set()


# ----------------------------------------------------------------------------- torch


def torch_device(device: str) -> Any:
    """The torch device for ``[engine] device``, resolved as the speaker encoder's is."""
    from voiced.encoder import resolve_device
    from voiced.errors import ConfigError

    try:
        return resolve_device(device or "auto")
    except ConfigError as exc:
        raise EngineError(str(exc)) from None


def load_network(model: Path, graph_sha256: str, device: Any) -> Any:
    """The float32 network of torchnet.py with the weights recovered from the graph, on ``device``
    (a torch device), in eval mode and without gradients of its own."""
    from voiced.engines.kokoro import torchweights
    from voiced.engines.kokoro.torchnet import KokoroNet

    path = torchweights.cached_weights(model, graph_sha256)
    try:
        state = torchweights.load_state(path)
        net = KokoroNet()
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # a file that passed its digest but not the network: say which
        raise EngineError(f"cannot load the torch weights {path}: {exc}") from exc
    return net.eval().requires_grad_(False).to(device)


class TorchBackend:
    """The float32 network of torchnet.py with the weights recovered from the graph."""

    name = "torch"
    pitch_control = True

    def __init__(self, model: Path, graph_sha256: str, device: str, threads: int | None, batch: int = 1) -> None:
        import torch

        resolved = torch_device(device)
        if threads:
            torch.set_num_threads(int(threads))  # process-wide: torch has one intra-op pool
        self._torch = torch
        self.net = load_network(model, graph_sha256, resolved)
        self.torch_device = resolved
        self.device = str(resolved) if resolved.type == "cpu" else f"cuda:{resolved.index or 0}"
        self.batcher: Batcher[tuple[list[int], np.ndarray, float, float], np.ndarray] = Batcher(self._batch, batch)

    def run(self, tokens: list[int], style: np.ndarray, speed: float, pitch: float) -> np.ndarray:
        """One utterance; calls made meanwhile by other threads share its batch (see Batcher)."""
        return self.batcher((tokens, np.asarray(style, dtype=np.float32).reshape(-1), float(speed), float(pitch)))

    def _batch(self, items: Sequence[tuple[list[int], np.ndarray, float, float]]) -> list[np.ndarray]:
        torch = self._torch
        dev = self.torch_device
        with torch.inference_mode():
            tokens = [torch.tensor([0, *t, 0], dtype=torch.long) for t, _, _, _ in items]
            styles = torch.tensor(np.stack([s for _, s, _, _ in items]), device=dev)
            speed = torch.tensor([v for _, _, v, _ in items], dtype=torch.float32, device=dev)
            pitch = torch.tensor([p for _, _, _, p in items], dtype=torch.float32, device=dev)
            out = self.net.batch(tokens, styles, speed, pitch)
        return [o.audio.float().cpu().numpy() for o in out]

    def release(self, tokens: list[int], style: np.ndarray) -> None:
        """torch's CPU allocator returns large blocks to the system as they are freed; on a GPU the
        cached blocks go back to the driver."""
        if self.torch_device.type == "cuda":
            self._torch.cuda.empty_cache()


def load_backend(name: str, model: Path, graph_sha256: str, device: str, threads: int | None, batch: int = 1) -> Backend:
    if name == "onnx":
        return OnnxBackend(model, device, threads)
    if name == "torch":
        return TorchBackend(model, graph_sha256, device, threads, batch)
    raise EngineError(f"unknown Kokoro backend {name!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Batcher", "OnnxBackend", "TorchBackend", "load_backend", "load_network", "torch_device"]
