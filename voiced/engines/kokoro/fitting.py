"""Voice cloning for Kokoro: fit the style pack so the speech it produces sounds like the reference.

Kokoro has no speaker encoder: a voice is a style pack (510 x 256; the first 128 dimensions drive
the decoder's timbre, the last 128 the prosody predictor). Similarity is judged the way the
daemon judges it, by the GE2E speaker encoder on the synthesized audio (24 kHz -> 16 kHz).

* quick: a convex blend of the base voices. The embedding of each base voice's speech on fixed
  calibration text is computed once (and cached on disk); the blend weights maximise the cosine
  between the target and the weighted mean of those embeddings (a fast surrogate, milliseconds),
  then one real synthesis checks the blend really beats the best single voice.
* refined: CMA-ES over a low-dimensional parametrisation (blend logits + offsets along the main
  directions of variation of the base styles), scored by real synthesis + GE2E, with a penalty
  for drifting out of the base voices' region (far-off styles lose intelligibility). The search
  is seeded from the embedding's bytes, so one reference always gives one result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from voiced.engines.base import Conditioning, EngineError

log = logging.getLogger(__name__)

# One short, phonetically varied text: each evaluation is a real synthesis (~1 s on 2 cores), so
# its length sets how many candidates a time budget affords.
CALIBRATION_TEXTS = ("Could you call me back this evening? The quick brown fox jumped over it.",)
EMBED_RATE = 16_000
DEFAULT_REFINE_BUDGET_S = 60.0
N_OFFSET_DIMS = 8  # offsets along principal directions of the base styles, beyond the blend
DRIFT_PENALTY = 0.02  # cosine points lost per unit (std-scaled) squared offset, averaged over dims
FIT_VERSION = "fit1"


class SpeakerEncoderLike(Protocol):
    def embed(self, wav16k: np.ndarray) -> np.ndarray: ...


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return v / (np.linalg.norm(v) + 1e-12)


def resample_24k_to_16k(audio: np.ndarray) -> np.ndarray:
    """Band-limited 24 kHz -> 16 kHz (soxr when installed, else an exact 2:3 polyphase FIR)."""
    audio = np.asarray(audio, dtype=np.float32)
    try:
        import soxr

        return soxr.resample(audio, 24_000, EMBED_RATE, quality="HQ").astype(np.float32)
    except ImportError:  # pragma: no cover - soxr is a project dependency
        taps = np.arange(-48, 49)
        h = np.sinc(taps / 3 * 2 * 0.45) * np.hamming(len(taps)) * 2 / 3 * 0.9 * 2
        up = np.zeros(len(audio) * 2, np.float32)
        up[::2] = audio
        return np.convolve(up, h.astype(np.float32), mode="same")[::3].astype(np.float32)


def blend_weights(target: np.ndarray, base_embs: np.ndarray, iters: int = 400) -> np.ndarray:
    """Simplex weights w maximising cos(sum_i w_i e_i, target): projected gradient ascent.

    ``base_embs`` is (n_voices, 256) of unit vectors. Runs in about a millisecond.
    """
    t = _unit(target)
    e = np.asarray(base_embs, dtype=np.float64)
    n = len(e)
    sims = e @ t
    w = np.full(n, 1.0 / n)
    w[np.argmax(sims)] += 1.0
    w /= w.sum()
    step = 0.5
    for _ in range(iters):
        m = w @ e
        norm = np.linalg.norm(m) + 1e-12
        # d/dw cos(m, t) = e (t/|m| - (m.t) m/|m|^3)
        grad = e @ (t / norm - (m @ t) * m / norm**3)
        w = _project_simplex(w + step * grad)
    return w


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u)
    k = np.nonzero(u * np.arange(1, len(v) + 1) > (css - 1))[0][-1]
    theta = (css[k] - 1) / (k + 1)
    return np.maximum(v - theta, 0.0)


class CMAES:
    """A small (mu/mu_w, lambda)-CMA-ES (Hansen's tutorial defaults), enough for ~20 dimensions.

    Written here rather than taken from the ``cma`` package: ~60 lines, no dependency, and the
    caller needs ask/tell with its own time budget and stop flag anyway.
    """

    def __init__(self, x0: np.ndarray, sigma: float, seed: int, popsize: int | None = None) -> None:
        self.n = n = len(x0)
        self.mean = np.asarray(x0, dtype=np.float64).copy()
        self.sigma = float(sigma)
        self.lam = popsize or 4 + int(3 * np.log(n))
        self.mu = self.lam // 2
        w = np.log(self.mu + 0.5) - np.log(np.arange(1, self.mu + 1))
        self.w = w / w.sum()
        self.mueff = 1.0 / np.sum(self.w**2)
        self.cc = (4 + self.mueff / n) / (n + 4 + 2 * self.mueff / n)
        self.cs = (self.mueff + 2) / (n + self.mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + self.mueff)
        self.cmu = min(1 - self.c1, 2 * (self.mueff - 2 + 1 / self.mueff) / ((n + 2) ** 2 + self.mueff))
        self.damps = 1 + 2 * max(0.0, np.sqrt((self.mueff - 1) / (n + 1)) - 1) + self.cs
        self.chin = np.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))
        self.pc = np.zeros(n)
        self.ps = np.zeros(n)
        self.C = np.eye(n)
        self.B = np.eye(n)
        self.D = np.ones(n)
        self.gen = 0
        self.rng = np.random.default_rng(seed)

    def ask(self) -> np.ndarray:
        z = self.rng.standard_normal((self.lam, self.n))
        return self.mean + self.sigma * (z * self.D) @ self.B.T

    def tell(self, xs: np.ndarray, losses: np.ndarray) -> None:
        """Update from candidates ``xs`` and their ``losses`` (lower is better)."""
        order = np.argsort(losses, kind="stable")[: self.mu]
        old = self.mean
        y = (xs[order] - old) / self.sigma
        self.mean = old + self.sigma * (self.w @ y)
        yw = self.w @ y
        c_inv_sqrt = self.B @ np.diag(1 / self.D) @ self.B.T
        self.ps = (1 - self.cs) * self.ps + np.sqrt(self.cs * (2 - self.cs) * self.mueff) * (c_inv_sqrt @ yw)
        self.gen += 1
        hsig = np.linalg.norm(self.ps) / np.sqrt(1 - (1 - self.cs) ** (2 * self.gen)) / self.chin < 1.4 + 2 / (self.n + 1)
        self.pc = (1 - self.cc) * self.pc + hsig * np.sqrt(self.cc * (2 - self.cc) * self.mueff) * yw
        rank_mu = (y.T * self.w) @ y
        self.C = ((1 - self.c1 - self.cmu) * self.C + self.c1 * (np.outer(self.pc, self.pc) + (1 - hsig) * self.cc * (2 - self.cc) * self.C)
                  + self.cmu * rank_mu)
        self.sigma *= np.exp((self.cs / self.damps) * (np.linalg.norm(self.ps) / self.chin - 1))
        self.C = (self.C + self.C.T) / 2
        evals, self.B = np.linalg.eigh(self.C)
        self.D = np.sqrt(np.maximum(evals, 1e-20))


class StyleFitter:
    """Fits Kokoro style packs to speaker embeddings; built once per engine (see KokoroEngine.fitter)."""

    def __init__(self, engine: Any, encoder: SpeakerEncoderLike, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.engine = engine
        self.encoder = encoder
        self.names = tuple(sorted(engine.voices))
        self.packs = np.stack([engine.voices[n] for n in self.names]).astype(np.float64)  # (V, 510, 256)
        self.tokens = [engine.tokens(engine.phonemize(t, "en-us")[0]) for t in CALIBRATION_TEXTS]
        self._basis = self._offset_basis()
        cache = Path(cache_dir or engine.cache_dir)
        t0 = time.perf_counter()
        self.base_embs = self._base_embeddings(cache)  # (V, n_texts, 256), unit rows
        log.info("kokoro fitter ready in %.1fs (%d base voices x %d calibration texts)",
                 time.perf_counter() - t0, len(self.names), len(self.tokens))

    # ----------------------------------------------------------------------------- helpers

    def _offset_basis(self) -> np.ndarray:
        """(N_OFFSET_DIMS, 256) directions, each scaled to one std of the base styles along it.

        Principal directions of all rows of all base packs: the ways Kokoro's trained styles
        actually vary, so offsets along them stay in the region the decoder knows.
        """
        rows = self.packs.reshape(-1, self.packs.shape[-1])
        centred = rows - rows.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        std = s / np.sqrt(len(rows) - 1)
        return vt[:N_OFFSET_DIMS] * std[:N_OFFSET_DIMS, None]

    def embed_audio(self, audio24k: np.ndarray) -> np.ndarray:
        return _unit(self.encoder.embed(resample_24k_to_16k(audio24k)))

    def _speak(self, pack: np.ndarray, text_index: int) -> np.ndarray:
        return self.engine.infer(self.tokens[text_index], pack.astype(np.float32), 1.0)

    def _embed_pack(self, pack: np.ndarray) -> np.ndarray:
        """(n_texts, 256) unit embeddings of a pack's speech on the calibration texts."""
        return np.stack([self.embed_audio(self._speak(pack, i)) for i in range(len(self.tokens))])

    def _encoder_fingerprint(self) -> str:
        """Identifies the encoder's behaviour, so cached embeddings die with a new encoder."""
        rng = np.random.default_rng(1234)
        t = np.arange(EMBED_RATE * 2) / EMBED_RATE
        probe = (0.1 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
        emb = np.round(np.asarray(self.encoder.embed(probe), dtype=np.float64), 3)
        return hashlib.sha256(emb.tobytes()).hexdigest()[:12]

    def _base_embeddings(self, cache: Path) -> np.ndarray:
        key = hashlib.sha256(f"{self.engine.version}|{FIT_VERSION}|{self.names}|{CALIBRATION_TEXTS}|{self._encoder_fingerprint()}".encode()).hexdigest()[:16]
        path = cache / f"kokoro-calibration-{key}.npy"
        try:
            embs = np.load(path, allow_pickle=False)
            if embs.shape == (len(self.names), len(self.tokens), 256):
                return embs
        except (OSError, ValueError):
            pass
        embs = np.stack([self._embed_pack(p) for p in self.packs])
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, embs)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache only costs time at the next start
            log.warning("cannot cache Kokoro calibration embeddings: %s", exc)
        return embs

    def score(self, pack: np.ndarray, target: np.ndarray) -> float:
        """Mean GE2E cosine between ``target`` and the pack's speech on the calibration texts."""
        return float(np.mean(self._embed_pack(pack) @ _unit(target)))

    def _conditioning(self, pack: np.ndarray, stage: str, **meta: Any) -> Conditioning:
        return Conditioning({"style": pack.astype(np.float32)}, {"engine": "kokoro", "stage": stage, "fit": FIT_VERSION, **meta})

    def stock_similarities(self, target: np.ndarray) -> dict[str, float]:
        """Cosine of each base voice's calibration speech to ``target`` (precomputed, instant)."""
        sims = np.einsum("vtd,d->vt", self.base_embs, _unit(target)).mean(axis=1)
        return {n: float(s) for n, s in zip(self.names, sims)}

    # ----------------------------------------------------------------------------- stages

    def quick(self, target: np.ndarray) -> Conditioning:
        """Best blend of the base voices (one real synthesis per calibration text to confirm it)."""
        t = _unit(target)
        stock = self.stock_similarities(t)
        best_name = max(stock, key=stock.get)
        w = blend_weights(t, _unit_rows(self.base_embs.mean(axis=1)))
        pack = np.tensordot(w, self.packs, axes=1)
        sim = self.score(pack, t)
        if sim < stock[best_name]:  # the surrogate can be wrong; never do worse than stock
            w = np.eye(len(self.names))[self.names.index(best_name)]
            pack, sim = self.packs[self.names.index(best_name)], stock[best_name]
        return self._conditioning(
            pack, "quick", weights={n: round(float(x), 4) for n, x in zip(self.names, w)},
            similarity=round(sim, 4), stock_best=best_name, stock_similarity=round(stock[best_name], 4),
        )

    def _decode(self, theta: np.ndarray) -> tuple[np.ndarray, float]:
        """Parameters -> (pack, penalty). theta = [blend logits (V), offsets (N_OFFSET_DIMS)]."""
        v = len(self.names)
        logits = theta[:v]
        w = np.exp(logits - logits.max())
        w /= w.sum()
        offsets = theta[v:]
        pack = np.tensordot(w, self.packs, axes=1) + (offsets @ self._basis)[None, :]
        penalty = DRIFT_PENALTY * float(np.mean(offsets**2))
        return pack, penalty

    def refine(
        self,
        target: np.ndarray,
        *,
        budget_s: float | None = None,
        previous: Conditioning | None = None,
        should_stop: Callable[[], bool] | None = None,
        max_evals: int | None = None,
    ) -> Conditioning:
        """CMA-ES on real synthesis within ``budget_s`` (default 60 s), from the quick blend."""
        t0 = time.perf_counter()
        t = _unit(target)
        budget = DEFAULT_REFINE_BUDGET_S if budget_s is None else float(budget_s)
        if previous is None or "weights" not in previous.meta:
            previous = self.quick(t)
        w0 = np.array([float(previous.meta["weights"].get(n, 0.0)) for n in self.names])
        logits0 = np.log(np.maximum(w0, 1e-3))
        logits0 -= logits0.max()
        x0 = np.concatenate([logits0, np.zeros(N_OFFSET_DIMS)])
        seed = int.from_bytes(hashlib.sha256(np.asarray(target, np.float32).tobytes()).digest()[:8], "little")
        es = CMAES(x0, sigma=0.6, seed=seed, popsize=8)
        best_x, best_fit = x0, float(previous.meta.get("similarity", -1.0))
        best_sim = best_fit
        # One evaluation costs about len(CALIBRATION_TEXTS) syntheses; stop before overrunning.
        per_eval = None
        evals = 0
        cap = max_evals if max_evals is not None else 10**9
        stopped = False
        while not stopped:
            xs = es.ask()
            losses = np.empty(len(xs))
            for i, x in enumerate(xs):
                elapsed = time.perf_counter() - t0
                if (should_stop and should_stop()) or evals >= cap or (per_eval and elapsed + per_eval > budget):
                    stopped = True
                    break
                e0 = time.perf_counter()
                pack, penalty = self._decode(x)
                sim = self.score(pack, t)
                fit = sim - penalty
                losses[i] = -fit
                evals += 1
                per_eval = time.perf_counter() - e0 if per_eval is None else 0.8 * per_eval + 0.2 * (time.perf_counter() - e0)
                if fit > best_fit:
                    best_x, best_fit, best_sim = x, fit, sim
            if not stopped:
                es.tell(xs, losses)
                log.debug("cma gen %d best %.4f sigma %.3f", es.gen, best_fit, es.sigma)
        if best_x is x0:
            pack = np.asarray(previous["style"], dtype=np.float64)
        else:
            pack, _ = self._decode(best_x)
        v = len(self.names)
        w = np.exp(best_x[:v] - best_x[:v].max())
        w /= w.sum()
        log.info("kokoro refine: %d evals in %.1fs, similarity %.3f -> %.3f", evals,
                 time.perf_counter() - t0, previous.meta.get("similarity", float("nan")), best_sim)
        return self._conditioning(
            pack, "refined", weights={n: round(float(x), 4) for n, x in zip(self.names, w)},
            offsets=[round(float(x), 4) for x in best_x[v:]], similarity=round(best_sim, 4),
            evaluations=evals, generations=es.gen, stock_best=previous.meta.get("stock_best"),
            stock_similarity=previous.meta.get("stock_similarity"),
        )


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / (np.linalg.norm(m, axis=-1, keepdims=True) + 1e-12)


__all__ = ["CMAES", "StyleFitter", "blend_weights", "resample_24k_to_16k", "CALIBRATION_TEXTS", "EngineError"]
