"""GE2E speaker encoder (3-layer LSTM d-vector), behaviour-compatible with resemblyzer 0.1.4.

Our own implementation of the reference pipeline, using only torch/numpy/webrtcvad at runtime:

* front end: 40-band Slaney power mel spectrogram (no log), 25 ms Hann window, 10 ms hop at
  16 kHz, centred frames with zero padding, as ``librosa.feature.melspectrogram`` (>= 0.10)
  computes it for resemblyzer;
* preprocessing: volume normalisation to -30 dBFS (increase only) and webrtcvad trimming of
  silences longer than 6 x 30 ms windows;
* utterance embedding: L2-normalised mean of the embeddings of 160-frame partial windows taken
  at 1.3 partials/s, keeping a zero-padded last window when it is >= 75 % covered.

The whole utterance goes through the model as one batch of partial windows, and the mel
spectrogram is computed once and windowed by view (unfold), never per partial. On CPUs with
native bfloat16 the LSTM runs in bf16 by default (``precision="auto"``; see resolve_precision).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from voiced.audio import SAMPLE_RATE, load_audio
from voiced.errors import AudioError, ConfigError

if TYPE_CHECKING:
    from voiced.config import EncoderConfig

log = logging.getLogger(__name__)

EMBEDDING_DIM = 256
MODEL_ID = "ge2e-resemblyzer"
# Bump when the front end or the embedding procedure changes (cached embeddings become stale).
FRONTEND_VERSION = 1

# Front end (resemblyzer hparams).
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
# Partial windows.
PARTIAL_FRAMES = 160  # 1.6 s
PARTIAL_RATE = 1.3  # partials per second
MIN_COVERAGE = 0.75
# Preprocessing.
TARGET_DBFS = -30.0
VAD_WINDOW = 30 * SAMPLE_RATE // 1000  # 480 samples
VAD_AVERAGE_WIDTH = 8
VAD_MAX_SILENCE = 6
_INT16_MAX = 2**15 - 1
# Below this much audio the only partial window would be less than MIN_COVERAGE filled
# (resemblyzer zero-pads anything, even 10 ms, into a window; we refuse that instead).
MIN_SAMPLES = int(math.ceil(MIN_COVERAGE * PARTIAL_FRAMES * HOP))

_WEIGHTS_FILE = "pretrained.pt"
_INSTALL_HINT = "install them with `pip install --no-deps resemblyzer==0.1.4` (the wheel ships pretrained.pt)"


class WeightsNotFoundError(ConfigError):
    """The pretrained GE2E weights could not be located or read."""


# --------------------------------------------------------------------------- front end


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / f_sp
    high = hz >= min_log_hz
    mel[high] = min_log_mel + np.log(hz[high] / min_log_hz) / logstep
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * f_sp
    high = mel >= min_log_mel
    hz[high] = min_log_hz * np.exp(logstep * (mel[high] - min_log_mel))
    return hz


@lru_cache(maxsize=8)
def mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, shape (n_mels, 1 + n_fft // 2), float32.

    Same construction as ``librosa.filters.mel(htk=False, norm="slaney")``: computed in float64,
    stored in float32. Cached; treat the result as read-only.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
    mel_pts = np.linspace(_hz_to_mel(np.array([fmin]))[0], _hz_to_mel(np.array([fmax]))[0], n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney norm: each filter has unit area in Hz, so band energy is comparable across bands.
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    out = weights.astype(np.float32)
    out.setflags(write=False)
    return out


class MelFrontEnd:
    """Power mel spectrogram on a torch device; window and filterbank are built once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Periodic Hann, as scipy.signal.get_window("hann", n) used by librosa.
        self.window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)
        self.filters = torch.from_numpy(mel_filterbank().copy()).to(device)  # (n_mels, n_freq)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """(n_samples,) float32 -> (n_frames, n_mels) with n_frames = 1 + n_samples // HOP."""
        spec = torch.stft(
            wav,
            n_fft=N_FFT,
            hop_length=HOP,
            window=self.window,
            center=True,
            pad_mode="constant",  # librosa >= 0.10 default; the golden data was made with it
            return_complex=True,
        )
        power = torch.view_as_real(spec).square().sum(-1)  # (n_freq, n_frames)
        return (self.filters @ power).T


# --------------------------------------------------------------------------- model


class GE2EModel(nn.Module):
    """3 x LSTM(256) -> last hidden state -> Linear(256) -> ReLU -> L2 normalise."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, EMBEDDING_DIM)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(batch, frames, n_mels) -> (batch, EMBEDDING_DIM) unit vectors."""
        # The LSTM may run in bfloat16 (see SpeakerEncoder precision); the head stays float32.
        _, (hidden, _) = self.lstm(mels.to(self.lstm.weight_ih_l0.dtype))
        raw = torch.relu(self.linear(hidden[-1].float()))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- slicing


def partial_starts(n_samples: int, rate: float = PARTIAL_RATE, min_coverage: float = MIN_COVERAGE) -> list[int]:
    """Start frames of the partial windows for an utterance of ``n_samples`` samples.

    Same arithmetic as resemblyzer's ``compute_partial_slices``; every window is
    PARTIAL_FRAMES long and the last one may run past the audio (to be zero padded).
    """
    if not 0 < min_coverage <= 1:
        raise ValueError("min_coverage must be in (0, 1]")
    n_frames = int(math.ceil((n_samples + 1) / HOP))
    step = int(round((SAMPLE_RATE / rate) / HOP))
    if not 0 < step <= PARTIAL_FRAMES:
        raise ValueError(f"partial rate {rate} out of range")
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (n_samples - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(starts) > 1:
        starts.pop()
    return starts


def mel_partials(frontend: MelFrontEnd, wav: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """(n, PARTIAL_FRAMES, n_mels) mel windows of ``wav`` at ``starts`` (from partial_starts).

    A view of one spectrogram (unfold), no per-partial copies. The waveform is zero-padded so
    the last window is full; the reference pads the waveform, not the mel, which matters because
    centred STFT frames near the end see the padding.
    """
    needed = (starts[-1] + PARTIAL_FRAMES) * HOP
    if needed >= len(wav):
        wav = torch.nn.functional.pad(wav, (0, needed - len(wav)))
    mel = frontend(wav)  # (frames, n_mels)
    step = starts[1] - starts[0] if len(starts) > 1 else 1
    return mel.unfold(0, PARTIAL_FRAMES, step)[: len(starts)].transpose(1, 2)


# --------------------------------------------------------------------------- preprocessing


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Scale up to ``target_dbfs`` RMS; never scales down (as resemblyzer, increase only)."""
    # Same float32 arithmetic as the reference, so the VAD sees the same int16 samples.
    rms = np.sqrt(np.mean((wav * _INT16_MAX) ** 2))
    if not rms > 0:
        return wav
    change_db = target_dbfs - 20 * np.log10(rms / _INT16_MAX)
    if change_db < 0:
        return wav
    return (wav * (10 ** (change_db / 20))).astype(np.float32, copy=False)


def _vad_flags(pcm: np.ndarray) -> np.ndarray:
    """webrtcvad (mode 3) speech flag per 30 ms window of int16 ``pcm``."""
    import webrtcvad  # local: only preprocessing needs it

    vad = webrtcvad.Vad(3)
    raw = memoryview(pcm.tobytes())
    step = VAD_WINDOW * 2  # bytes
    return np.fromiter(
        (vad.is_speech(raw[i : i + step], SAMPLE_RATE) for i in range(0, len(raw), step)),
        dtype=bool,
        count=len(pcm) // VAD_WINDOW,
    )


def long_silence_mask(wav: np.ndarray) -> np.ndarray:
    """Per-sample keep flags for ``wav`` cut to whole 30 ms windows: False inside long silences."""
    wav = wav[: len(wav) - len(wav) % VAD_WINDOW]
    if len(wav) == 0:
        return np.zeros(0, dtype=bool)
    # The reference casts without clipping (int16 wrap-around); clipping is the sane reading
    # and identical for in-range audio.
    pcm = np.clip(np.round(wav * _INT16_MAX), -32768, 32767).astype(np.int16)
    flags = _vad_flags(pcm).astype(np.int64)
    # Moving average over 8 windows (3 before, 4 after, zero padded), then rounded: with
    # round-half-to-even, k/8 rounds to 1 exactly when k >= 5.
    padded = np.concatenate(
        (np.zeros((VAD_AVERAGE_WIDTH - 1) // 2, np.int64), flags, np.zeros(VAD_AVERAGE_WIDTH // 2, np.int64))
    )
    sums = np.convolve(padded, np.ones(VAD_AVERAGE_WIDTH, np.int64), mode="valid")
    voiced = sums * 2 > VAD_AVERAGE_WIDTH
    # Binary dilation with a centred structuring element of VAD_MAX_SILENCE + 1 ones.
    kernel = np.ones(VAD_MAX_SILENCE + 1, np.int64)
    mask = np.convolve(voiced.astype(np.int64), kernel, mode="same") > 0
    return np.repeat(mask, VAD_WINDOW)


def trim_long_silences(wav: np.ndarray) -> np.ndarray:
    """Drop silences longer than VAD_MAX_SILENCE windows (audio is cut to whole 30 ms windows)."""
    mask = long_silence_mask(wav)
    return wav[: len(mask)][mask]


def preprocess_wav(wav: np.ndarray) -> np.ndarray:
    """Normalise volume and trim long silences of a float32 mono 16 kHz waveform."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError("expected a mono (1-D) waveform")
    return trim_long_silences(normalize_volume(wav))


# --------------------------------------------------------------------------- weights


def locate_weights() -> Path:
    """Path of resemblyzer's ``pretrained.pt``, found without importing resemblyzer."""
    try:
        # find_spec on a top-level name locates the package without executing its __init__
        # (which would pull in librosa and scipy).
        spec = importlib.util.find_spec("resemblyzer")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            candidate = Path(location) / _WEIGHTS_FILE
            if candidate.is_file():
                return candidate
    raise WeightsNotFoundError(f"speaker encoder weights ({_WEIGHTS_FILE}) not found; {_INSTALL_HINT}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> torch.device; ConfigError when unusable."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available (use auto or cpu)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def _cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bfloat16 natively here (AVX512-BF16 / AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" | "fp32" | "bf16" -> "fp32" or "bf16"."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"invalid precision {precision!r}: use auto, fp32 or bf16")
    if precision == "auto":
        # On CPU the 3x160-step LSTM is compute bound and oneDNN's native bf16 path runs it
        # ~1.8x faster; the cost is ~5e-5 in cosine to the float32 embedding (measured on the
        # golden clips: >= 0.99991), far inside the 0.999 parity bound. CUDA is fast anyway.
        return "bf16" if device.type == "cpu" and _cpu_has_fast_bf16() else "fp32"
    return precision


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["model_state"]
    except FileNotFoundError:
        raise WeightsNotFoundError(f"speaker encoder weights not found at {path}; {_INSTALL_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is one clear error
        raise WeightsNotFoundError(f"cannot load speaker encoder weights from {path}: {exc}") from None
    # The checkpoint also holds GE2E training-only parameters (similarity_weight/bias).
    return {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- public API


class SpeakerEncoder:
    """Loads the GE2E model once; ``embed`` turns 16 kHz mono audio into a unit 256-d vector."""

    model_id: str = MODEL_ID

    @classmethod
    def from_config(cls, settings: EncoderConfig) -> SpeakerEncoder:
        """The encoder ``[encoder]`` describes (device, weights, threads)."""
        return cls(device=settings.device, weights_path=settings.weights or None, threads=settings.threads or None)

    def __init__(
        self,
        device: str = "auto",
        weights_path: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        *,
        precision: str = "auto",
    ) -> None:
        """``precision``: "fp32", "bf16" (LSTM in bfloat16) or "auto" (bf16 on CPUs with native
        bf16 support, else fp32)."""
        self._device = resolve_device(device)
        self.precision = resolve_precision(precision, self._device)
        if self.precision == "bf16" and self._device.type == "cuda":
            # measured on an H100: 9.8 ms per 12 s clip against 7.7 in fp32; cuDNN refuses to pack
            # bf16 LSTM weights, so torch re-packs them on every call
            log.warning("precision bf16 on %s is slower than fp32 for this encoder; use auto or fp32 there", self._device)
        if threads is not None:
            if threads < 1:
                raise ConfigError("threads must be >= 1")
            # Process-wide in torch; the daemon owns the process, so that is what we want.
            torch.set_num_threads(threads)
        path = Path(weights_path) if weights_path is not None else locate_weights()
        if not path.is_file():
            raise WeightsNotFoundError(f"speaker encoder weights not found at {path}; {_INSTALL_HINT}")
        model = GE2EModel()
        try:
            model.load_state_dict(_load_state(path))
        except RuntimeError as exc:
            raise WeightsNotFoundError(f"{path} does not hold GE2E encoder weights: {exc}") from None
        if self.precision == "bf16":
            model.lstm.to(torch.bfloat16)
        self._model = model.to(self._device).eval()
        # cuDNN wants the LSTM's weights in one contiguous block; without this it re-packs them
        # on every call (and warns). A no-op on CPU.
        self._model.lstm.flatten_parameters()
        self._frontend = MelFrontEnd(self._device)
        self.weights_path = path
        # Precision is deliberately not part of the version: bf16 and fp32 embeddings of one
        # clip agree to ~5e-5 in cosine, so caches stay valid across machines.
        self.version = f"{FRONTEND_VERSION}-{_sha256(path)[:12]}"
        self._lock = threading.Lock()
        log.info("speaker encoder %s (%s) loaded on %s, %s", self.model_id, self.version, self._device,
                 self.precision)

    @property
    def device(self) -> torch.device:
        return self._device

    def embed(self, wav: np.ndarray, *, preprocess: bool = True) -> np.ndarray:
        """Unit-norm float32 (256,) embedding of float32 mono 16 kHz audio."""
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1:
            raise AudioError(f"expected mono audio, got an array of shape {wav.shape}")
        if not np.isfinite(wav).all():
            raise AudioError("non-finite samples (NaN or infinity) in audio")
        if preprocess:
            wav = preprocess_wav(wav)
        if not np.any(wav):
            raise AudioError("no speech found (audio is silent)")
        if len(wav) < MIN_SAMPLES:
            raise AudioError(
                f"no speech found: only {len(wav) / SAMPLE_RATE:.2f} s of speech, "
                f"at least {MIN_SAMPLES / SAMPLE_RATE:.2f} s needed"
            )
        with self._lock, torch.inference_mode():
            out = self._embed_tensor(torch.from_numpy(wav))
        if not np.isfinite(out).all():
            raise AudioError("no speech found (the encoder produced no usable embedding)")
        return out

    def embed_file(
        self,
        path: str | os.PathLike[str],
        *,
        preprocess: bool = True,
        max_duration_s: float | None = None,
    ) -> np.ndarray:
        """Load ``path`` (any format/rate, see voiced.audio.load_audio) and embed it."""
        audio = load_audio(path, SAMPLE_RATE, max_duration_s=max_duration_s)
        return self.embed(audio.samples, preprocess=preprocess)

    def _embed_tensor(self, wav: torch.Tensor) -> np.ndarray:
        partials = mel_partials(self._frontend, wav.to(self._device), partial_starts(len(wav))).contiguous()
        embeds = self._model(partials)
        raw = embeds.mean(dim=0)
        return (raw / raw.norm()).cpu().numpy().astype(np.float32, copy=False)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0.0 when either is all zeros)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / denom) if denom > 0 else 0.0
