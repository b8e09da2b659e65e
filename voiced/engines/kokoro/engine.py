"""Kokoro-82M, the built-in engine: the int8 ONNX graph in onnxruntime, or the same weights in torch."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voiced.engines.base import (
    Conditioning,
    Engine,
    EngineError,
    ParamError,
    TextError,
    check_seed,
    check_speed,
    whole_number,
)
from voiced.engines import text
from voiced.engines.kokoro import phonemes, post, weights
from voiced.engines.kokoro.backends import BACKENDS, Backend, TorchBackend, load_backend
from voiced.engines.kokoro.fitting import FIT_VERSION
from voiced.engines.kokoro.post import PITCH_RANGE, Voicing

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
STYLE_DIM = 256
MAX_TOKENS = 510  # model context is 512 including the two pad tokens
DEFAULT_MAX_CHARS = 100_000
MAX_THREADS = 256  # intra-op threads; more is a typo, not a machine
MAX_BATCH = 256
FIT_METHODS = {"search": "jacobian", "gradient": "gradient"}  # option value -> StyleFitter.refine method
DEFAULT_VOICE = "jf_alpha"
# Bump the suffix whenever the text front end or the voice post-processing changes what a cache
# entry would hold; fitting.FIT_VERSION (also in ``version``) covers changes to the fit itself.
ENGINE_VERSION = "kokoro-v1.0-int8+fe1+post1"

_WARMUP_TEXT = "Hello, this is a warm up."
# onnxruntime keeps the buffers it grew for the longest input it has run (about 400 MiB more for
# a 312-token sentence than for a short one): after this long without a model call they are
# given back. The next call grows them again, which costs it about 5%, so the wait is long enough
# that a client speaking every few seconds never pays it.
IDLE_RELEASE_S = 30.0


def split_phonemes(ps: str, limit: int = MAX_TOKENS) -> list[str]:
    """Split a phoneme string into pieces of at most ``limit`` characters (tokens).

    Prefers clause punctuation, then word boundaries; a single word longer than the limit (only
    in garbage input) is cut hard.
    """
    if len(ps) <= limit:
        return [ps]
    pieces: list[str] = []
    rest = ps
    while len(rest) > limit:
        window = rest[: limit + 1]
        cut = max(window.rfind(p) for p in ",;:—…!?.")
        if cut < limit // 3:  # no clause mark in a useful place: cut at the last space
            cut = window.rfind(" ")
            if cut <= 0:
                cut = limit
        else:
            cut += 1  # keep the mark with the clause it ends
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


class KokoroEngine(Engine):
    """Kokoro-82M: phonemes (espeak-ng) + a 256-d style vector -> 24 kHz speech.

    A voice is a style *pack* of shape (510, 256): row ``n`` is the style used for an utterance
    of ``n`` tokens, as in Kokoro's own voice files. Cloning fits that pack (see fitting.py) and
    three optional arrays: ``pitch`` (a factor on the model's F0 curve, see graph.py), ``warp``
    (pitch and formants) and ``eq`` (band gains matching the reference's spectrum), the last two
    applied after the model (see post.py).
    """

    name = "kokoro"
    version = ENGINE_VERSION
    sample_rate = SAMPLE_RATE
    stages = ("stock", "quick", "refined")

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
        threads: int | None = None,
        encoder: Any = None,
        default_voice: str = DEFAULT_VOICE,
        backend: str = "onnx",
        batch: int = 0,
        fit: str = "search",
    ) -> None:
        """``cache_dir`` receives the joined model; ``encoder`` is a SpeakerEncoder (for cloning).

        ``max_chars``, ``threads`` (0 or None: the runtime's default), ``default_voice`` and
        ``backend`` ("onnx": the int8 graph in onnxruntime; "torch": the float32 network with the
        same weights, see torchnet.py) and ``batch`` (torch: the most sentences that calls made at
        the same time share in one padded model call; 1 runs each alone; 0, the default, means 8
        on a GPU and 1 on a CPU, where a padded batch is slower than its items one by one) are
        the ``[engine] options`` of the daemon's config; a bad value raises ParamError naming it.
        ``fit`` chooses how the refined stage is made: "search" (derivative-free, on synthesis and
        GE2E; any backend) or "gradient" (Adam through the network on several views of the
        speaker, see gradfit.py; on onnx the torch network is loaded for the fit alone).
        """
        self.cache_dir = Path(cache_dir)
        self.max_chars = whole_number("max_chars", max_chars, 1)
        self.threads = None if threads is None else whole_number("threads", threads, 0, MAX_THREADS)
        if not isinstance(default_voice, str):
            raise ParamError(f"default_voice must be a base voice's name, got {default_voice!r}")
        self.default_voice = default_voice
        if backend not in BACKENDS:
            raise ParamError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend_name = backend
        self.batch = whole_number("batch", batch, 0, MAX_BATCH)
        if fit not in FIT_METHODS:
            raise ParamError(f"fit must be one of {', '.join(FIT_METHODS)}, got {fit!r}")
        self.fit = fit
        self._encoder = encoder
        self._files = weights.locate()
        self.vocab = weights.load_vocab(self._files)
        self.voices = weights.load_voices(self._files)
        if default_voice not in self.voices:
            raise ParamError(f"default_voice: unknown base voice {default_voice!r}; have {sorted(self.voices)}")
        self.device = "unloaded"
        self.pitch_control = False
        self._warned_no_pitch = False
        self.backend: Backend | None = None
        self._fitter: Any = None
        self._fitter_lock = threading.Lock()
        self._fit_net: Any = None  # on onnx: the torch network the gradient fit runs through
        self._fit_net_lock = threading.Lock()
        self._model: Path | None = None
        self._device_request = "auto"
        self._calls = threading.Lock()  # guards the three fields below
        self._running = 0  # model calls in progress
        self._last_call = 0.0  # time.monotonic() at the end of the last model call
        self._used_since_release = False
        # the fit method names the voices it makes, so switching it refits them (search, the
        # default, keeps the name voices already prepared are cached under)
        method = "" if fit == "search" else f"-{fit}"
        self.version = f"{ENGINE_VERSION}+{FIT_VERSION}{method}-{self._files.sha256[:8]}"

    # ----------------------------------------------------------------------------- lifecycle

    def load(self, device: str = "auto") -> None:
        """Join/verify the weights if needed, load the backend, run one real synthesis."""
        path = weights.assemble_model(self.cache_dir, self._files)
        self._model, self._device_request = path, device
        t0 = time.perf_counter()
        self.backend = load_backend(self.backend_name, path, self._files.sha256, device, self.threads, self.batch)
        if self.batch == 0 and isinstance(self.backend, TorchBackend):  # see __init__: GPUs gain, CPUs lose
            self.backend.batcher.max_batch = 8 if self.backend.torch_device.type == "cuda" else 1
        self.device = self.backend.device
        self.pitch_control = self.backend.pitch_control
        audio = np.concatenate(list(self.synthesize(_WARMUP_TEXT, self.default_conditioning(), {})))
        log.info("kokoro (%s) loaded on %s in %.2fs (warm-up %.2fs of audio)", self.backend_name, self.device,
                 time.perf_counter() - t0, len(audio) / SAMPLE_RATE)
        if self._encoder is not None:
            # Embeddings of the base voices' calibration speech (a few seconds, cached on disk)
            # so the quick stage is ready within tens of milliseconds of a reference embedding.
            self.fitter()

    @property
    def loaded(self) -> bool:
        return self.backend is not None

    def _require_loaded(self) -> None:
        if self.backend is None:
            raise EngineError("the Kokoro engine is not loaded; call load() first")

    # ----------------------------------------------------------------------------- voices

    def base_conditioning(self, voice: str) -> Conditioning:
        """One of the stock voices, as a conditioning."""
        if voice not in self.voices:
            raise EngineError(f"unknown base voice {voice!r}; have {sorted(self.voices)}")
        return Conditioning({"style": self.voices[voice]}, {"engine": self.name, "stage": "stock", "voice": voice})

    def default_conditioning(self) -> Conditioning:
        return self.base_conditioning(self.default_voice)

    @staticmethod
    def style_pack(conditioning: Mapping[str, np.ndarray]) -> np.ndarray:
        """The (510, 256) style pack of a conditioning; a single (256,) style is broadcast."""
        if not isinstance(conditioning, Mapping) or "style" not in conditioning:
            raise EngineError("conditioning has no 'style' array (prepared by another engine?)")
        style = np.asarray(conditioning["style"], dtype=np.float32)
        if style.size == STYLE_DIM:
            style = np.broadcast_to(style.reshape(1, STYLE_DIM), (MAX_TOKENS, STYLE_DIM))
        style = style.reshape(style.shape[0], -1)
        if style.shape[1] != STYLE_DIM or style.shape[0] < 1 or not np.isfinite(style).all():
            raise EngineError(f"conditioning style has shape {style.shape}, expected (510, 256), finite")
        return style

    @staticmethod
    def voicing(conditioning: Mapping[str, np.ndarray]) -> Voicing:
        """The warp, pitch and EQ gains (dB) of a conditioning; defaults for what it lacks."""

        def factor(key: str, lo: float, hi: float) -> float:
            if key not in conditioning:
                return 1.0
            v = np.asarray(conditioning[key], dtype=np.float64).reshape(-1)
            if v.shape != (1,) or not np.isfinite(v).all() or not lo <= float(v[0]) <= hi:
                raise EngineError(f"conditioning {key} must be one number in [{lo}, {hi}]")
            return float(v[0])

        warp = factor("warp", *post.WARP_RANGE)
        pitch = factor("pitch", *PITCH_RANGE)
        eq = None
        if "eq" in conditioning:
            eq = np.asarray(conditioning["eq"], dtype=np.float64).reshape(-1)
            if eq.shape != (post.N_BANDS,) or not np.isfinite(eq).all() or np.abs(eq).max() > post.LIMIT_DB:
                raise EngineError(f"conditioning eq must hold {post.N_BANDS} finite gains within +-{post.LIMIT_DB:g} dB")
        return Voicing(warp, pitch, eq)

    # ----------------------------------------------------------------------------- text

    def phonemize(self, text_: str, lang: str = "en-us") -> list[str]:
        """Text -> list of phoneme strings, one per sentence piece, each within MAX_TOKENS."""
        if not isinstance(lang, str) or not lang or len(lang) > 32:
            raise ParamError(f"lang must be an espeak language code such as 'en-us', got {lang!r}")
        pieces: list[str] = []
        for sentence in text.prepare(text_, lang, self.max_chars):
            ps = phonemes.phonemize(sentence, lang, self.vocab)
            if ps:
                pieces += split_phonemes(ps)
        if not pieces:
            raise TextError("text has nothing to pronounce")
        return pieces

    def tokens(self, ps: str) -> list[int]:
        return [self.vocab[c] for c in ps if c in self.vocab]

    # ----------------------------------------------------------------------------- synthesis

    def infer(self, tokens: list[int], style_pack: np.ndarray, speed: float = 1.0, pitch: float = 1.0) -> np.ndarray:
        """One model call: up to MAX_TOKENS token ids -> float32 audio."""
        self._require_loaded()
        if not tokens:
            return np.zeros(0, np.float32)
        if pitch != 1.0 and not self.pitch_control:
            self._warn_no_pitch()
        assert self.backend is not None
        tokens = tokens[:MAX_TOKENS]
        style = self._style_row(style_pack, len(tokens))
        with self._calls:
            self._running += 1
        try:
            out = self.backend.run(tokens, style, speed, pitch)
        finally:
            with self._calls:
                self._running -= 1
                self._last_call = time.monotonic()
                self._used_since_release = True
        audio = np.asarray(out, dtype=np.float32).reshape(-1)
        # int8 kernels on unusual styles can overflow; never hand NaNs to a sound card.
        return np.nan_to_num(np.clip(audio, -1.0, 1.0), nan=0.0)

    @staticmethod
    def _style_row(style_pack: np.ndarray, n_tokens: int) -> np.ndarray:
        """The pack's style for an utterance of ``n_tokens`` tokens, (1, 256) float32."""
        style = style_pack[min(n_tokens, style_pack.shape[0] - 1)].reshape(1, STYLE_DIM)
        return np.ascontiguousarray(style, dtype=np.float32)

    def idle(self) -> None:
        """Release the model's grown buffers once no call has run for IDLE_RELEASE_S."""
        with self._calls:
            due = not self._running and self._used_since_release and time.monotonic() - self._last_call >= IDLE_RELEASE_S
        if due:
            self.release_memory()

    def release_memory(self) -> None:
        """Give back the memory the backend holds beyond what a short input needs.

        Calls running meanwhile on other threads, and another release, are safe.
        """
        if self.backend is None:
            return
        with self._calls:
            self._used_since_release = False
        (ps,) = self.phonemize("Hi.")
        tokens = self.tokens(ps)
        self.backend.release(tokens, self._style_row(self.voices[self.default_voice], len(tokens)))
        # What the backend freed may stay in the C allocator's heap: glibc raises its mmap
        # threshold after large frees, so after a fit or a long input big buffers come from
        # the heap, which free() does not return to the system. Trimming it does.
        from voiced.engines.kokoro.gradfit import give_back_heap

        give_back_heap()

    def synthesize(self, text_: str, conditioning: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> Iterator[np.ndarray]:
        """Validate everything eagerly, then return a generator of per-sentence chunks."""
        self._require_loaded()
        if not isinstance(params, Mapping):
            raise ParamError("params must be a mapping")
        unknown = set(params) - {"speed", "lang", "seed"}
        if unknown:
            raise ParamError(f"unknown synthesis parameters: {', '.join(sorted(map(str, unknown)))}")
        speed = check_speed(params)
        check_seed(params)  # accepted for the common interface; this ONNX graph is deterministic
        lang = params.get("lang", "en-us") or "en-us"
        pack = self.style_pack(conditioning)
        voicing = self.voicing(conditioning)
        pieces = self.phonemize(text_, lang)  # raises TextError before any audio is produced
        return self._generate(pieces, pack, speed, voicing)

    def _generate(self, pieces: list[str], pack: np.ndarray, speed: float, voicing: Voicing) -> Iterator[np.ndarray]:
        for ps in pieces:
            yield self.render(self.tokens(ps), pack, speed, voicing)

    def render(self, tokens: list[int], pack: np.ndarray, speed: float = 1.0, voicing: Voicing = Voicing()) -> np.ndarray:
        """One model call plus the voice's post-processing (the model speaks at speed / warp)."""
        warp, pitch, eq = voicing
        if warp == 1.0 and eq is None:
            return self.infer(tokens, pack, speed, pitch)
        return post.finish(self.infer(tokens, pack, speed / warp, pitch), warp, eq)

    def _warn_no_pitch(self) -> None:
        if not self._warned_no_pitch:
            self._warned_no_pitch = True
            log.warning("this Kokoro model has no pitch control: voices fitted with a pitch are spoken at the model's own")

    def synthesize_all(self, text_: str, conditioning: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Whole utterance as one array (convenience for tests and fitting)."""
        return np.concatenate(list(self.synthesize(text_, conditioning, params or {})))

    # ----------------------------------------------------------------------------- cloning

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            try:
                from voiced.encoder import SpeakerEncoder
            except ImportError as exc:
                raise EngineError("voice cloning needs the speaker encoder (voiced.encoder)") from exc
            self._encoder = SpeakerEncoder()
        return self._encoder

    def fit_network(self) -> Any:
        """The torch network the gradient fit runs through: the torch backend's own, or on onnx
        one loaded on first use (the same weights in float32, about 330 MB, kept for the next
        fit), so voices fitted by gradient are spoken by the faster int8 graph."""
        self._require_loaded()
        net = getattr(self.backend, "net", None)
        if net is not None:
            return net
        with self._fit_net_lock:
            if self._fit_net is None:
                from voiced.engines.kokoro.backends import load_network, torch_device

                assert self._model is not None
                t0 = time.perf_counter()
                self._fit_net = load_network(self._model, self._files.sha256, torch_device(self._device_request))
                log.info("kokoro: torch network for the gradient fit loaded in %.2fs", time.perf_counter() - t0)
            return self._fit_net

    def fitter(self) -> Any:
        """The voice fitter, built (and its calibration embeddings computed) on first use."""
        with self._fitter_lock:
            if self._fitter is None:
                from voiced.engines.kokoro.fitting import StyleFitter

                self._require_loaded()
                self._fitter = StyleFitter(self, self.encoder)
            return self._fitter

    def prepare_voice(
        self,
        reference: np.ndarray,
        embedding: np.ndarray,
        *,
        stage: str,
        budget_s: float | None = None,
        previous: Conditioning | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> Conditioning:
        if stage not in self.stages:
            raise ParamError(f"unknown stage {stage!r}; expected one of {self.stages}")
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if emb.shape != (STYLE_DIM,) or not np.isfinite(emb).all() or not np.any(emb):
            raise EngineError(f"reference embedding must be a finite non-zero (256,) vector, got shape {emb.shape}")
        fitter = self.fitter()
        ref = None if reference is None else np.asarray(reference, dtype=np.float32).reshape(-1)
        if ref is not None and not np.isfinite(ref).all():
            raise EngineError("reference audio has non-finite samples")
        if stage == "stock":
            return fitter.stock(emb)
        if stage == "quick":
            # unchecked: a drop of thousands reaches it in minutes, not hours; refined checks it
            return fitter.quick(emb, ref, check=False)
        return fitter.refine(emb, budget_s=budget_s, previous=previous, should_stop=should_stop, reference=ref,
                             progress=progress, method=FIT_METHODS[self.fit])
