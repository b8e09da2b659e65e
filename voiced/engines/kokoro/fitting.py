"""Voice cloning for Kokoro: fit the style pack so the speech it produces sounds like the reference.

Kokoro has no speaker encoder: a voice is a style pack (510 x 256; the first 128 dimensions drive
the decoder's timbre, the last 128 the prosody predictor). Similarity is judged the way the
daemon judges it, by the GE2E speaker encoder on the synthesized audio (24 kHz -> 16 kHz).

Beside the style pack a voice carries a spectral-envelope EQ, a pitch/formant warp (post.py)
and a factor on the model's own F0 curve (graph.py): the five base styles (four of them female,
all Japanese) span little of the space of English speakers, and matching the reference's
long-term spectrum is worth more similarity than any style move they allow.

* quick: a convex blend of the base voices. The speech of each base voice on fixed calibration
  text is synthesized once (audio and embeddings cached on disk); for a reference, each is EQ-
  matched to the reference's long-term spectrum and embedded (milliseconds each), the blend
  weights maximise the cosine between the target and the weighted mean of those embeddings (a
  fast surrogate), then one real synthesis checks the blend really beats the best single voice.
* refined: a short line search over the warp, then derivative-free search from the quick blend,
  scored by real synthesis + EQ matched to that candidate + GE2E, with a penalty (and a hard
  cap) on drifting out of the base styles' region and on warping far (both lose
  intelligibility). Default: trust-region Gauss-Newton on the 256-d embedding with a finite-
  difference + Broyden Jacobian over offsets along the base styles' principal directions, per
  half. Last (EQ_SHARE of the budget), the pitch of the best candidate is chosen on a few
  sentences, its EQ re-matched on more speech and tuned by gradient ascent through the encoder
  (eqtune.py); both are kept only if they raise the similarity.
  ``[engine] options = { fit = "gradient" }`` makes the refined stage instead by gradient
  through the torch network, on several views of the speaker (gradfit.py), whichever backend
  then speaks the voice.

The budget buys a fixed amount of work (search evaluations, EQ tuning steps: what takes that
long on a 2-core x86 CPU), not wall-clock time, so a file gives the same voice on every run and
every machine whatever else the machine is doing: a busy or slow machine takes longer for the
same voice instead of making a worse one. Only past TIME_CAP_FACTOR times the budget of real
(unpaused) time is a fit cut short, with a warning, since its result then depends on the machine.

One module (about 720 lines) because the stages share one StyleFitter's state: the base
voices' cached speech and embeddings, the offset basis and the budget's clock. The gradient
fit and the EQ tuner, which need none of it, are gradfit.py and eqtune.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from voiced.engines.base import Conditioning, EngineError, SpeakerEncoder
from voiced.engines.kokoro import eqtune, post
from voiced.engines.kokoro.post import PITCH_RANGE, Voicing, resample_24k_to_16k
from voiced.fsutil import atomic_writer, read_npz

log = logging.getLogger(__name__)

# Short, phonetically varied text: each evaluation is one real synthesis per sentence (~1 s each on
# 2 cores), so their length sets how many candidates a time budget affords. Every sentence must give
# the speaker encoder at least 1.2 s of speech; every sentence listed is spoken.
CALIBRATION_TEXTS = ("Could you call me back this evening?",)
EMBED_RATE = 16_000
DEFAULT_REFINE_BUDGET_S = 60.0
N_OFFSET_DIMS = 4  # per half (timbre, prosody): offsets along the base styles' principal directions
FD_STEP = 0.7  # finite-difference step, in base-style stds (smaller drowns in the encoder's noise)
MAX_DRIFT = 4.0  # how far (in stds) refined styles may move from the quick blend
DRIFT_PENALTY = 0.02  # cosine points lost per unit (std-scaled) squared offset, averaged over dims
# The refined voice's EQ is finally tuned through the encoder (eqtune.py) on these sentences plus
# the calibration text: more speech than the search affords per candidate, so the gains it picks
# hold on other text. The tuning gets EQ_SHARE of the refine budget.
TUNING_TEXTS = (
    "She sells fresh fish on the shore.",
    "Where were you when the lights went out?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Honestly, I think we ought to try the other road tomorrow morning.",
    "Seven large boxes arrived at the office just after lunch today.",
    "A small dog barked at the mailman every single morning.",
    "Turn left at the second light and park behind the bakery.",
)
# Seven sentences, so the tuning fits the speaker rather than the sentences; per second it is
# worth more than further style search. The share also pays for speaking the pitch texts at
# each pitch tried.
EQ_SHARE = 0.62
WARP_GRID = (0.9, 0.95, 1.05, 1.1)  # tried around the quick voice's warp (1.0) before the style search
WARP_PENALTY = 1.0  # cosine points lost per unit squared log-warp (0.9 or 1.1: about 0.01)
# The pitch (the model's own F0, formants untouched) is chosen last, for the search's best style,
# among these factors, on the calibration text and the first PITCH_TUNING_TEXTS tuning texts
# (chosen first, the search and the EQ would undo what it gains).
PITCH_GRID = (0.9, 1.12)
PITCH_TUNING_TEXTS = 2
PITCH_PENALTY = 0.3  # cosine points per unit squared log-pitch (0.9 or 1.12: about 0.003)
# What the work costs on a 2-core x86 CPU (onnxruntime int8, torch CPU), turning budget seconds
# into counts: one search evaluation (synthesis of the calibration text, EQ match, embedding), the
# tuning's set-up (speaking the pitch and tuning texts) and one EQ tuning step. A 60 s budget buys
# 27 evaluations and 74 tuning steps.
EVAL_COST_S = 0.84
TUNE_SETUP_COST_S = 15.0
TUNE_STEP_COST_S = 0.30
TIME_CAP_FACTOR = 3.0  # real time, in budgets, after which a fit is cut short
FIT_VERSION = "fit6"


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return v / (np.linalg.norm(v) + 1e-12)


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


class StyleFitter:
    """Fits Kokoro style packs to speaker embeddings; built once per engine (see KokoroEngine.fitter)."""

    def __init__(self, engine: Any, encoder: SpeakerEncoder, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.engine = engine
        self.encoder = encoder
        self.names = tuple(sorted(engine.voices))
        self.packs = np.stack([engine.voices[n] for n in self.names]).astype(np.float64)  # (V, 510, 256)
        # Every sentence of every calibration text is one synthesis (the engine speaks per sentence).
        self.tokens = [engine.tokens(ps) for t in CALIBRATION_TEXTS for ps in engine.phonemize(t, "en-us")]
        self.tuning_tokens = [engine.tokens(ps) for t in TUNING_TEXTS for ps in engine.phonemize(t, "en-us")]
        self._tuner: Any = None
        self._tuner_checked = False
        self._basis = self._offset_basis()
        # each style dimension's spread over every row of every base pack: the gradient fit's unit
        self._spread = self.packs.reshape(-1, self.packs.shape[-1]).std(axis=0)
        cache = Path(cache_dir or engine.cache_dir)
        t0 = time.perf_counter()
        self.base_audio: list[list[np.ndarray]] = []  # per base voice, per calibration text (24 kHz)
        self.base_embs = self._base_embeddings(cache)  # (V, n_texts, 256), unit rows
        # their long-term spectra, for the unchecked quick stage's EQ
        self.base_bands = np.stack([post.band_powers(np.concatenate(a), post.SAMPLE_RATE) for a in self.base_audio])
        # Now, not at the first voice: the quick stage's first EQ would import scipy.signal
        # (0.7 s, mostly holding the interpreter) while the daemon answers requests.
        post.apply_eq(np.zeros(post.FIR_TAPS, np.float32), np.ones(post.N_BANDS))
        log.info("kokoro fitter ready in %.1fs (%d base voices x %d calibration texts)",
                 time.perf_counter() - t0, len(self.names), len(self.tokens))

    # ----------------------------------------------------------------------------- helpers

    def _offset_basis(self) -> np.ndarray:
        """(2 * N_OFFSET_DIMS, 256) directions, each scaled to one std of the base styles along it.

        Principal directions of all rows of all base packs: the ways Kokoro's trained styles
        actually vary, so offsets along them stay in the region the decoder knows.
        """
        rows = self.packs.reshape(-1, self.packs.shape[-1])
        centred = rows - rows.mean(axis=0)
        dims = rows.shape[1]
        out = []
        # Separately per half, so timbre (decoder) and prosody (predictor) can move independently.
        for half in (slice(0, dims // 2), slice(dims // 2, dims)):
            _, s, vt = np.linalg.svd(centred[:, half], full_matrices=False)
            block = np.zeros((N_OFFSET_DIMS, dims))
            block[:, half] = vt[:N_OFFSET_DIMS] * (s[:N_OFFSET_DIMS, None] / np.sqrt(len(rows) - 1))
            out.append(block)
        return np.concatenate(out)

    def embed_audio(self, audio24k: np.ndarray) -> np.ndarray:
        return _unit(self.encoder.embed(resample_24k_to_16k(audio24k)))

    def _speak(self, pack: np.ndarray, text_index: int, warp: float = 1.0, pitch: float = 1.0) -> np.ndarray:
        return self.engine.render(self.tokens[text_index], pack.astype(np.float32), 1.0, Voicing(warp, pitch))

    def _embed_matched(self, audio: list[np.ndarray], ref_bands: np.ndarray | None,
                       bands: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(mean unit embedding, eq gains) of calibration audio, EQ-matched to ``ref_bands`` if given
        (``bands``: the audio's own long-term spectrum, where it is known already)."""
        gains = None
        if ref_bands is not None:
            if bands is None:
                bands = post.band_powers(np.concatenate(audio), post.SAMPLE_RATE)
            gains = post.match_gains(ref_bands, bands)
            audio = [post.apply_eq(a, gains) for a in audio]
        return np.mean([self.embed_audio(a) for a in audio], axis=0), gains

    def _evaluate(self, pack: np.ndarray, warp: float, ref_bands: np.ndarray | None,
                  pitch: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        """Synthesize the calibration texts with ``pack``, ``warp`` and ``pitch``, match the EQ, embed."""
        return self._embed_matched([self._speak(pack, i, warp, pitch) for i in range(len(self.tokens))], ref_bands)

    def _encoder_fingerprint(self) -> str:
        """Identifies the encoder's behaviour, so cached embeddings die with a new encoder."""
        rng = np.random.default_rng(1234)
        t = np.arange(EMBED_RATE * 2) / EMBED_RATE
        probe = (0.1 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
        emb = np.round(np.asarray(self.encoder.embed(probe), dtype=np.float64), 3)
        return hashlib.sha256(emb.tobytes()).hexdigest()[:12]

    def _base_embeddings(self, cache: Path) -> np.ndarray:
        """Embeddings of the base voices' calibration speech; their audio goes to ``base_audio``."""
        key = hashlib.sha256(f"{self.engine.version}|{FIT_VERSION}|{self.names}|{CALIBRATION_TEXTS}|{self._encoder_fingerprint()}".encode()).hexdigest()[:16]
        path = cache / f"kokoro-calibration-{key}.npz"
        n_voices, n_texts = len(self.names), len(self.tokens)
        try:
            npz = read_npz(path)
            embs = npz["embs"]
            audio = [[np.asarray(npz[f"audio_{v}_{i}"], np.float32) for i in range(n_texts)] for v in range(n_voices)]
            if embs.shape == (n_voices, n_texts, 256):
                self.base_audio = audio
                return embs
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing or damaged: made again
            pass
        self.base_audio = [[self._speak(p, i) for i in range(n_texts)] for p in self.packs]
        embs = np.stack([[self.embed_audio(a) for a in voice] for voice in self.base_audio])
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_writer(path) as f:
                np.savez(f, embs=embs, **{f"audio_{v}_{i}": a for v, voice in enumerate(self.base_audio) for i, a in enumerate(voice)})
        except OSError as exc:  # a read-only cache only costs time at the next start
            log.warning("cannot cache Kokoro calibration embeddings: %s", exc)
        return embs

    def _conditioning(self, pack: np.ndarray, stage: str, warp: float, eq: np.ndarray | None, pitch: float = 1.0,
                      **meta: Any) -> Conditioning:
        arrays = {"style": pack.astype(np.float32), "warp": np.array([warp], np.float32)}
        if pitch != 1.0:
            arrays["pitch"] = np.array([pitch], np.float32)
        if eq is not None:
            arrays["eq"] = np.asarray(eq, np.float32)
        return Conditioning(arrays, {"engine": "kokoro", "stage": stage, "fit": FIT_VERSION, **meta})

    def stock_similarities(self, target: np.ndarray) -> dict[str, float]:
        """Cosine of each base voice's calibration speech to ``target`` (precomputed, instant)."""
        sims = np.einsum("vtd,d->vt", self.base_embs, _unit(target)).mean(axis=1)
        return {n: float(s) for n, s in zip(self.names, sims)}

    @staticmethod
    def reference_bands(reference: np.ndarray | None, previous: Conditioning | None = None) -> np.ndarray | None:
        """Long-term spectrum of the 16 kHz reference (or the one an earlier stage recorded)."""
        if reference is not None and np.asarray(reference).size:
            return post.band_powers(np.asarray(reference, dtype=np.float64), 16_000)
        if previous is not None and "reference_bands_db" in previous.meta:
            return 10 ** (np.asarray(previous.meta["reference_bands_db"], dtype=np.float64) / 10)
        return None

    # ----------------------------------------------------------------------------- stages

    def stock(self, target: np.ndarray) -> Conditioning:
        """The base voice nearest the speaker by embedding, as it is: no synthesis, so a voice of a
        large drop is usable within milliseconds of its embedding; quick and refined follow."""
        sims = self.stock_similarities(target)
        best = max(sims, key=sims.get)
        k = self.names.index(best)
        return self._conditioning(
            self.packs[k], "stock", 1.0, None, weights={n: float(n == best) for n in self.names},
            similarity=round(sims[best], 4), stock_best=best, stock_similarity=round(sims[best], 4),
        )

    def quick(self, target: np.ndarray, reference: np.ndarray | None = None, *, check: bool = True) -> Conditioning:
        """Best blend of the base voices with an EQ matched to ``reference``.

        ``check``: speak the blend once (the calibration sentence) to measure it, keep the best
        single base voice instead where the blend does worse, and match the EQ to the blend's own
        speech. Without it (about 15x cheaper, for a large drop) the blend and its EQ are as the
        base voices' embeddings and spectra predict, and the meta says ``checked: False``;
        ``refine`` checks such a start before it builds on it.
        """
        return self._quick(_unit(target), self.reference_bands(reference), check)

    def _quick(self, t: np.ndarray, ref_bands: np.ndarray | None, check: bool) -> Conditioning:
        stock = self.stock_similarities(t)
        best_name = max(stock, key=stock.get)
        if ref_bands is None:
            embs, gains = self.base_embs.mean(axis=1), [None] * len(self.names)
        else:  # each base voice EQ-matched to the reference, from its cached calibration audio
            matched = [self._embed_matched(audio, ref_bands, bands) for audio, bands in zip(self.base_audio, self.base_bands)]
            embs, gains = np.stack([m[0] for m in matched]), [m[1] for m in matched]
        single = _unit_rows(embs) @ t
        w = blend_weights(t, _unit_rows(embs))
        pack = np.tensordot(w, self.packs, axes=1)
        meta: dict[str, Any] = {}
        if ref_bands is not None:
            meta["reference_bands_db"] = [round(float(x), 3) for x in 10 * np.log10(ref_bands)]
        if not check:
            eq = None if ref_bands is None else post.match_gains(ref_bands, w @ self.base_bands)
            predicted = float(_unit(w @ _unit_rows(embs)) @ t)
            return self._conditioning(
                pack, "quick", 1.0, eq, weights={n: round(float(x), 4) for n, x in zip(self.names, w)},
                predicted_similarity=round(predicted, 4), checked=False, stock_best=best_name,
                stock_similarity=round(stock[best_name], 4), **meta,
            )
        emb, eq = self._evaluate(pack, 1.0, ref_bands)
        sim = float(emb @ t)
        # the surrogate can be wrong; never do worse than the best single (matched or stock) voice
        k = int(np.argmax(single))
        if float(single[k]) > sim:
            w, pack, sim, eq = np.eye(len(self.names))[k], self.packs[k], float(single[k]), gains[k]
        if stock[best_name] > sim:
            k = self.names.index(best_name)
            w, pack, sim, eq = np.eye(len(self.names))[k], self.packs[k], stock[best_name], None
        return self._conditioning(
            pack, "quick", 1.0, eq, weights={n: round(float(x), 4) for n, x in zip(self.names, w)},
            similarity=round(sim, 4), stock_best=best_name, stock_similarity=round(stock[best_name], 4), **meta,
        )

    def refine(
        self,
        target: np.ndarray,
        *,
        budget_s: float | None = None,
        previous: Conditioning | None = None,
        should_stop: Callable[[], bool] | None = None,
        max_evals: int | None = None,
        method: str = "jacobian",
        reference: np.ndarray | None = None,
        clock: Callable[[], float] = time.perf_counter,
        progress: Callable[[float], None] | None = None,
    ) -> Conditioning:
        """Improve on the quick voice with real synthesis + GE2E within ``budget_s`` (default 60 s).

        First the warp: the quick voice at each of WARP_GRID (penalised by WARP_PENALTY), the
        best kept for what follows. Then the style, every candidate scored with its own matched
        EQ. ``method="jacobian"`` (default): trust-region Gauss-Newton on the embedding, with the
        Jacobian of embedding w.r.t. style offsets estimated by finite differences and kept up to
        date by Broyden updates; every evaluation yields a 256-d embedding, not just a score,
        which makes it about twice as sample-efficient as an evolution strategy here.
        ``method="gradient"``: Adam through the torch network (``engine.fit_network``), see gradfit.py;
        ``max_evals`` then counts its steps.
        ``reference`` (16 kHz) gives the spectrum to match; without it the one the quick stage
        recorded in its meta is used. ``budget_s`` sets the work (see ``work_for_budget``);
        ``max_evals`` overrides its number of search evaluations. ``clock`` (seconds) is read
        for the time cap only; tests give one that does not depend on the machine's speed.
        ``progress`` is told the share of the fit's work done (0-1) as it goes.
        """
        clock = _Clock(should_stop, clock, progress)
        t0 = clock.now()
        t = _unit(target)
        budget = max(0.0, DEFAULT_REFINE_BUDGET_S if budget_s is None else float(budget_s))
        if method not in ("jacobian", "gradient"):
            raise EngineError(f"unknown refine method {method!r}")
        if previous is None or "weights" not in previous.meta:
            previous = self.quick(t, reference)
        ref_bands = self.reference_bands(reference, previous)
        if method == "gradient":
            return self._refine_gradient(t, previous, ref_bands, reference, budget, max_evals, clock, t0)
        if previous.meta.get("checked") is False and not clock.stop():
            # an unchecked quick voice is a prediction: the search starts from the measured one,
            # so a refined voice is the same whichever way its quick stage was made
            previous = self._quick(t, ref_bands, check=True)
        tune = ref_bands is not None and self.tuner() is not None
        evals, eq_steps = work_for_budget(budget, tune)
        if max_evals is not None:
            evals = max_evals
        cap = budget * TIME_CAP_FACTOR  # one cap for the whole fit: a slow search may use the tuning's share
        clock.work_total = evals * EVAL_COST_S + (TUNE_SETUP_COST_S + eq_steps * TUNE_STEP_COST_S if tune and eq_steps > 0 else 0.0)
        state = _Budget(clock, t0, cap, evals)
        start = self._previous_point(previous)
        start = self._search_warp(t, start, ref_bands, state)
        best, offsets, w = self._refine_jacobian(t, previous, start, ref_bands, state)
        meta: dict[str, Any] = {k: previous.meta[k] for k in ("reference_bands_db",) if k in previous.meta}
        cut = state.cut
        if tune and eq_steps > 0:
            best, meta["eq_tuning"] = self._tune_eq(t, best, ref_bands, eq_steps, t0 + cap, clock)
            cut = cut or meta["eq_tuning"].get("reason") == "no time" or meta["eq_tuning"].get("steps", eq_steps) < eq_steps
        cut = cut and not clock.stopped
        clock.finish()
        if cut:
            meta["cut"] = True
            log.warning("kokoro refine cut short after %.0fs, %g times its %gs budget (%d of %d evaluations): this "
                        "voice depends on the machine's speed and load; on this machine a smaller budget gives one that does not",
                        clock.now() - t0, TIME_CAP_FACTOR, budget, state.evals, evals)
        # a fit told to stop is thrown away by its caller and run again: not worth an info line
        log.log(logging.DEBUG if clock.stopped else logging.INFO,
                "kokoro refine (%s)%s: %d evals in %.1fs (%.1fs paused), similarity %.3f -> %.3f (warp %.3f, pitch %.3f)",
                method, " stopped" if clock.stopped else "", state.evals, clock.now() - t0, clock.paused,
                previous.meta.get("similarity", float("nan")), best.sim, best.warp, best.pitch)
        return self._conditioning(
            best.pack, "refined", best.warp, best.eq, best.pitch, method=method,
            weights={n: round(float(x), 4) for n, x in zip(self.names, w)},
            offsets=[round(float(x), 4) for x in offsets], similarity=round(best.sim, 4), evaluations=state.evals,
            stock_best=previous.meta.get("stock_best"), stock_similarity=previous.meta.get("stock_similarity"),
            quick_similarity=previous.meta.get("similarity"), **meta,
        )

    def _refine_gradient(self, t: np.ndarray, previous: Conditioning, ref_bands: np.ndarray | None,
                         reference: np.ndarray | None, budget: float, max_steps: int | None, clock: _Clock,
                         t0: float) -> Conditioning:
        """The refine stage by gradient (gradfit.py), from ``previous`` as it is."""
        from voiced.engines.kokoro import gradfit

        net = self.engine.fit_network()
        if ref_bands is None:
            raise EngineError("the gradient fit needs the reference recording")
        steps = gradfit.steps_for_budget(budget) if max_steps is None else max(1, int(max_steps))
        clock.work_total = steps * gradfit.STEP_COST_S
        start = self.engine.voicing(previous)
        fit = gradfit.GradientFit(net, self.encoder, self.tokens + self.tuning_tokens[:gradfit.TUNING_SENTENCES],
                                  previous["style"], self._spread, t, ref_bands, reference, start.eq, start.pitch)
        cap = budget * TIME_CAP_FACTOR
        cut = False
        try:
            while fit.steps < steps and not clock.stop():
                if clock.now() - t0 > cap:
                    cut = True
                    break
                if not fit.step(clock.stop):
                    break
                clock.did(gradfit.STEP_COST_S)
        finally:
            gradfit.give_back_heap()
        clock.finish()
        out = fit.result()
        meta: dict[str, Any] = {k: previous.meta[k] for k in ("reference_bands_db", "weights") if k in previous.meta}
        sim = float("nan")
        if not clock.stopped:  # a stopped fit is thrown away by its caller: no synthesis to measure it
            sim = float(self._embed_matched([self.engine.render(tokens, out.pack, 1.0, Voicing(1.0, out.pitch, out.eq))
                                             for tokens in self.tokens], None)[0] @ t)
            meta["similarity"] = round(sim, 4)
        if cut and not clock.stopped:
            meta["cut"] = True
            log.warning("kokoro refine cut short after %.0fs, %g times its %gs budget (%d of %d steps)",
                        clock.now() - t0, TIME_CAP_FACTOR, budget, out.steps, steps)
        log.log(logging.DEBUG if clock.stopped else logging.INFO,
                "kokoro refine (gradient)%s: %d steps in %.1fs (%.1fs paused), similarity %.3f (pitch %.3f, band %.0f Hz)",
                " stopped" if clock.stopped else "", out.steps, clock.now() - t0, clock.paused, sim, out.pitch,
                fit.band_hz)
        return self._conditioning(
            out.pack, "refined", 1.0, out.eq, out.pitch, method="gradient", steps=out.steps, objective=out.terms,
            band_hz=round(fit.band_hz), stock_best=previous.meta.get("stock_best"),
            stock_similarity=previous.meta.get("stock_similarity"), quick_similarity=previous.meta.get("similarity"),
            **meta,
        )

    def tuner(self) -> Any:
        """The EQ tuner (eqtune.EqTuner), or None when the encoder does not allow one."""
        if not self._tuner_checked:
            self._tuner, self._tuner_checked = eqtune.EqTuner.create(self.encoder), True
        return self._tuner

    def _tune_eq(self, t: np.ndarray, best: _Point, ref_bands: np.ndarray, steps: int, deadline: float,
                 clock: _Clock) -> tuple[_Point, dict[str, Any]]:
        """Choose the pitch, re-match the EQ on more speech, tune it through the encoder (``steps``).

        The pitch: the best voice's own and each of PITCH_GRID (relative to it), scored on the
        pitch texts with a matched EQ, penalised by PITCH_PENALTY. The result is kept only when
        the tuning raises the mean cosine over all the tuning speech and does not lower the
        calibration text's, so ``similarity`` never falls below the search's best.
        """

        def speak(texts: list[list[int]], pitch: float) -> list[np.ndarray] | None:
            audio = []
            for tokens in texts:
                if clock.stop() or clock.now() > deadline:
                    return None
                audio.append(self.engine.render(tokens, best.pack.astype(np.float32), 1.0, Voicing(best.warp, pitch)))
                clock.did(TUNE_SETUP_COST_S / spoken)
            return audio

        pitch_texts = [*self.tokens, *self.tuning_tokens[:PITCH_TUNING_TEXTS]]
        pitches = [best.pitch]
        if self.engine.pitch_control:
            pitches += [float(np.clip(best.pitch * f, *PITCH_RANGE)) for f in PITCH_GRID]
        spoken = len(pitches) * len(pitch_texts) + len(self.tuning_tokens[PITCH_TUNING_TEXTS:])

        def step_done() -> bool:  # the tuner asks before each step: one more step's work is done
            clock.did(TUNE_STEP_COST_S)
            return clock.stop()
        tried: list[tuple[float, float, list[np.ndarray]]] = []  # (penalised score, pitch, audio)
        for pitch in pitches:
            audio = speak(pitch_texts, pitch)
            if audio is None:
                break
            emb, _ = self._embed_matched(audio, ref_bands)
            tried.append((float(emb @ t) - _pitch_penalty(pitch), pitch, audio))
        _, pitch, first = max(tried, key=lambda x: x[0], default=(0.0, best.pitch, []))
        rest = speak(self.tuning_tokens[PITCH_TUNING_TEXTS:], pitch) if first else None
        if rest is None:
            return best, {"kept": False, "reason": "no time"}
        audio = first + rest
        info: dict[str, Any] = {"pitches": {str(round(p, 3)): round(sc, 4) for sc, p, _ in tried}}
        matched = post.match_gains(ref_bands, post.band_powers(np.concatenate(audio), post.SAMPLE_RATE))
        try:
            gains, before, after, steps = self.tuner().tune(audio, matched, t, steps=steps, deadline=deadline,
                                                               should_stop=step_done, clock=clock.now)
        except Exception as exc:  # noqa: BLE001 - it leans on the encoder's internals; the search's voice stands
            log.warning("EQ tuning failed, keeping the matched EQ: %s", exc)
            return best, {**info, "kept": False, "reason": "failed"}
        n_cal = len(self.tokens)
        cal = float(np.mean([self.embed_audio(post.apply_eq(a, gains)) for a in audio[:n_cal]], axis=0) @ t)
        info.update(steps=steps, matched=round(before, 4), tuned=round(after, 4), calibration=round(cal, 4))
        if not after > before or cal < best.sim:
            return best, {**info, "kept": False}
        return _Point(best.pack, best.warp, gains, cal, pitch), {**info, "pitch": round(pitch, 3), "kept": True}

    def _weights(self, previous: Conditioning) -> np.ndarray:
        return np.array([float(previous.meta["weights"].get(n, 0.0)) for n in self.names])

    def _previous_point(self, previous: Conditioning) -> _Point:
        """The quick (or earlier) voice as a starting point, with the similarity it recorded."""
        v = self.engine.voicing(previous)
        eq = None if v.eq is None else np.asarray(v.eq, dtype=np.float64)
        return _Point(np.asarray(previous["style"], dtype=np.float64), v.warp, eq,
                      float(previous.meta.get("similarity", -1.0)), v.pitch)

    def _search_warp(self, t: np.ndarray, start: _Point, ref_bands: np.ndarray | None, state: _Budget) -> _Point:
        """The quick voice at each warp of WARP_GRID (relative to its own); the best, penalised."""
        best, best_fit = start, start.sim - _warp_penalty(start.warp)
        lo, hi = post.WARP_RANGE
        for factor in WARP_GRID:
            warp = float(np.clip(start.warp * factor, lo, hi))
            out = state.run(lambda warp=warp: self._evaluate(start.pack, warp, ref_bands, start.pitch))
            if out is None:
                break
            sim = float(out[0] @ t)
            if sim - _warp_penalty(warp) > best_fit:
                best, best_fit = _Point(start.pack, warp, out[1], sim, start.pitch), sim - _warp_penalty(warp)
        return best

    def _refine_jacobian(self, t: np.ndarray, previous: Conditioning, start: _Point, ref_bands: np.ndarray | None,
                         state: _Budget) -> tuple[_Point, np.ndarray, np.ndarray]:
        base, warp, pitch = start.pack, start.warp, start.pitch
        w = self._weights(previous)
        basis = self._basis
        n = len(basis)
        d = np.zeros(n)
        best, best_d = start, d.copy()

        def evaluate(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
            return state.run(lambda: self._evaluate(base + (offsets @ basis)[None], warp, ref_bands, pitch))

        first = evaluate(d)  # the start's embedding (its score came from other calls)
        if first is None:
            return best, d, w
        e0 = first[0]
        jac: np.ndarray | None = None
        radius = 1.5
        while not state.exhausted():
            if jac is None:  # finite differences, one evaluation per direction
                cols = []
                for k in range(n):
                    ek = evaluate(d + FD_STEP * np.eye(n)[k])
                    if ek is None:
                        break
                    cols.append((ek[0] - e0) / FD_STEP)
                if len(cols) < n:
                    break
                jac = np.stack(cols, axis=1)
            step = _trust_step(e0, jac, t, d, radius)
            out = evaluate(d + step)
            if out is None:
                break
            e1 = out[0]
            # Broyden rank-one update keeps the model current without n new evaluations.
            jac = jac + np.outer(e1 - e0 - jac @ step, step) / (step @ step + 1e-12)
            sim1 = float(e1 @ t) - DRIFT_PENALTY * float(np.mean((d + step) ** 2))
            cur = float(e0 @ t) - DRIFT_PENALTY * float(np.mean(d**2))
            if sim1 > cur:
                d, e0 = d + step, e1
                radius = min(radius * 1.5, MAX_DRIFT)
                if float(e1 @ t) > best.sim:
                    best, best_d = _Point(base + (d @ basis)[None], warp, out[1], float(e1 @ t), pitch), d.copy()
            else:
                radius *= 0.5
                if radius < 0.2:  # the model is stale: re-estimate it at the current point
                    jac, radius = None, 1.0
        return best, best_d, w

class _Point:
    """A candidate voice: style pack, warp, matched EQ (or None), its similarity, pitch."""

    __slots__ = ("pack", "warp", "eq", "sim", "pitch")

    def __init__(self, pack: np.ndarray, warp: float, eq: np.ndarray | None, sim: float, pitch: float = 1.0) -> None:
        self.pack, self.warp, self.eq, self.sim, self.pitch = pack, warp, eq, sim, pitch


def work_for_budget(budget_s: float, tune: bool = True) -> tuple[int, int]:
    """(search evaluations, EQ tuning steps) that take about ``budget_s`` on a 2-core x86 CPU.

    The search gets 1 - EQ_SHARE of the budget when the EQ is tuned, all of it otherwise; the
    tuning gets the rest less its set-up, and no steps when that leaves too little.
    """
    if not tune:
        return round(budget_s / EVAL_COST_S), 0
    evals = round(budget_s * (1 - EQ_SHARE) / EVAL_COST_S)
    steps = round((budget_s * EQ_SHARE - TUNE_SETUP_COST_S) / TUNE_STEP_COST_S)
    return evals, int(np.clip(steps, 0, eqtune.STEPS))


def _warp_penalty(warp: float) -> float:
    return WARP_PENALTY * float(np.log(warp)) ** 2


def _pitch_penalty(pitch: float) -> float:
    return PITCH_PENALTY * float(np.log(pitch)) ** 2


class _Clock:
    """``source`` time (perf_counter by default) that stands still while ``should_stop`` blocks.

    The daemon pauses a fit (its ``should_stop`` does not return) while synthesis requests wait,
    so a time budget must count only the time the fit ran. ``stopped`` records a True answer:
    the caller wants the stage abandoned.
    """

    def __init__(self, should_stop: Callable[[], bool] | None,
                 source: Callable[[], float] = time.perf_counter,
                 progress: Callable[[float], None] | None = None) -> None:
        self._should_stop = should_stop
        self._source = source
        self._progress = progress
        self.paused = 0.0
        self.stopped = False
        self.work_total = 0.0  # the fit's planned work, in EVAL_COST_S-like seconds
        self.work_done = 0.0

    def did(self, cost: float) -> None:
        """``cost`` more of the planned work is done: tell ``progress`` the share, never past 0.99."""
        self.work_done += cost
        if self._progress is not None and self.work_total > 0:
            self._progress(min(0.99, self.work_done / self.work_total))

    def finish(self) -> None:
        if self._progress is not None:
            self._progress(1.0)

    def now(self) -> float:
        return self._source() - self.paused

    def stop(self) -> bool:
        if self._should_stop is None:
            return False
        t0 = self._source()
        try:
            self.stopped = self.stopped or bool(self._should_stop())
        finally:
            self.paused += self._source() - t0
        return self.stopped


class _Budget:
    """Counts evaluations and refuses one that would overrun the time budget or a stop request."""

    def __init__(self, clock: _Clock, t0: float, budget_s: float, max_evals: int | None) -> None:
        self.clock, self.t0, self.budget, self.max_evals = clock, t0, budget_s, max_evals
        self.evals = 0
        self.per_eval: float | None = None
        self.cut = False  # refused for time, not for the count or a stop request

    def exhausted(self) -> bool:
        if self.clock.stop():
            return True
        if self.max_evals is not None and self.evals >= self.max_evals:
            return True
        elapsed = self.clock.now() - self.t0
        self.cut = elapsed + (self.per_eval or 0.0) > self.budget
        return self.cut

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() if the budget allows one more evaluation, else None."""
        if self.exhausted():
            return None
        e0 = self.clock.now()
        out = fn()
        took = self.clock.now() - e0
        self.per_eval = took if self.per_eval is None else 0.7 * self.per_eval + 0.3 * took
        self.evals += 1
        self.clock.did(EVAL_COST_S)
        return out


def _trust_step(e0: np.ndarray, jac: np.ndarray, t: np.ndarray, d: np.ndarray, radius: float) -> np.ndarray:
    """Step s, |s| <= radius, maximising the linear model's cos(e0 + J s, t) minus the drift penalty."""
    s = np.zeros(jac.shape[1])
    lam = 2 * DRIFT_PENALTY / len(s)
    for _ in range(300):
        m = e0 + jac @ s
        nm = np.linalg.norm(m) + 1e-12
        grad = jac.T @ (t / nm - (m @ t) * m / nm**3) - lam * (d + s)
        s = s + 0.3 * grad
        total = d + s
        if np.linalg.norm(total) > MAX_DRIFT:  # stay within MAX_DRIFT stds of the quick blend
            s = total * (MAX_DRIFT / np.linalg.norm(total)) - d
        if np.linalg.norm(s) > radius:
            s *= radius / np.linalg.norm(s)
    return s


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / (np.linalg.norm(m, axis=-1, keepdims=True) + 1e-12)


__all__ = ["CALIBRATION_TEXTS", "StyleFitter", "blend_weights", "work_for_budget"]
