"""Speaker-encoder benchmark: voiced.encoder vs resemblyzer 0.1.4 on the test clips (CPU).

Both sides get the same preprocessed 16 kHz samples (ours: voiced.encoder.preprocess_wav) and
are timed over the whole embedding call: mel front end + model + averaging, i.e. our
``SpeakerEncoder.embed(wav, preprocess=False)`` against resemblyzer's
``VoiceEncoder.embed_utterance(wav)``. Calls are interleaved and the median per clip is kept,
so background load hits both sides alike. Preprocessing is timed separately.

Usage:  python bench/bench_encoder.py [--repeats 15] [--threads N] [--testdata DIR]
resemblyzer (+ librosa) is optional: without it only our own figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402
from voiced.encoder import SpeakerEncoder, cosine, preprocess_wav  # noqa: E402

CLIPS = ["allison_a.wav", "allison_b.flac", "carlo_a.wav", "carlo_b.ogg", "june_a.wav", "june_b.wav"]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_timed(fn) for _ in range(repeats))


def _load_resemblyzer() -> tuple[Any, Any, Any] | None:
    try:
        from resemblyzer import VoiceEncoder
        from resemblyzer import audio as rs_audio
        from resemblyzer import preprocess_wav as rs_preprocess
    except ImportError as exc:
        print(f"resemblyzer not installed ({exc}); skipping the comparison.\n"
              "  to compare: pip install webrtcvad-wheels librosa && pip install --no-deps resemblyzer==0.1.4")
        return None
    return VoiceEncoder("cpu", verbose=False), rs_audio, rs_preprocess


def main() -> int:
    default_data = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).resolve().parents[2] / "shared" / "testdata")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--testdata", type=Path, default=default_data)
    args = ap.parse_args()
    print(describe(), flush=True)

    golden = json.loads((args.testdata / "golden-resemblyzer.json").read_text())
    raw = {name: sf.read(args.testdata / "voices" / name, dtype="float32")[0] for name in CLIPS}

    t0 = time.perf_counter()
    ours = SpeakerEncoder(device="cpu", threads=args.threads)
    print(f"voiced encoder {ours.model_id} {ours.version} ({ours.precision}): loaded in "
          f"{time.perf_counter() - t0:.2f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    ours32 = SpeakerEncoder(device="cpu", precision="fp32")  # the exact-arithmetic variant
    rs = _load_resemblyzer()

    pre = {name: preprocess_wav(wav) for name, wav in raw.items()}
    # Warm-up (first calls build oneDNN primitives, fill caches) on both sides.
    for wav in pre.values():
        ours.embed(wav, preprocess=False)
        ours32.embed(wav, preprocess=False)
        if rs:
            rs[0].embed_utterance(wav)

    print(f"\n{'clip':<15}{'speech s':>9}{'pre ours':>10}{'pre rs':>9}{'embed ours':>12}{'ours fp32':>11}{'embed rs':>10}{'speedup':>9}{'fp32':>7}"
          f"{'cos model':>11}{'cos pipe':>10}{'cos live':>10}")
    tot_ours = tot_32 = tot_rs = 0.0
    worst_model = worst_pipe = 1.0
    embeds: dict[str, np.ndarray] = {}
    for name in CLIPS:
        wav = pre[name]
        t_pre = _median_ms(lambda: preprocess_wav(raw[name]), args.repeats)
        t_pre_rs = _median_ms(lambda: rs[2](raw[name], source_sr=16000), args.repeats) if rs else float("nan")
        times_ours: list[float] = []
        times_32: list[float] = []
        times_rs: list[float] = []
        for _ in range(args.repeats):  # interleaved, so load spikes hit both sides
            times_ours.append(_timed(lambda: ours.embed(wav, preprocess=False)))
            times_32.append(_timed(lambda: ours32.embed(wav, preprocess=False)))
            if rs:
                times_rs.append(_timed(lambda: rs[0].embed_utterance(wav)))
        t_ours = statistics.median(times_ours)
        t_32 = statistics.median(times_32)
        tot_32 += t_32
        t_rs = statistics.median(times_rs) if rs else float("nan")
        tot_ours += t_ours
        tot_rs += t_rs
        embeds[name] = emb = ours.embed(wav, preprocess=False)
        c_model = cosine(ours.embed(raw[name], preprocess=False), golden[name]["model_only"])
        c_pipe = cosine(emb, golden[name]["pipeline"])
        c_live = cosine(emb, rs[0].embed_utterance(rs[2](raw[name], source_sr=16000))) if rs else float("nan")
        worst_model, worst_pipe = min(worst_model, c_model), min(worst_pipe, c_pipe)
        print(f"{name:<15}{len(wav) / 16000:>9.2f}{t_pre:>8.2f}ms{t_pre_rs:>7.2f}ms{t_ours:>10.2f}ms{t_32:>9.2f}ms{t_rs:>8.2f}ms"
              f"{t_rs / t_ours:>8.2f}x{t_rs / t_32:>6.2f}x{c_model:>11.6f}{c_pipe:>10.6f}{c_live:>10.6f}")

    n = len(CLIPS)
    print(f"\nmean embed time per clip: ours ({ours.precision}) {tot_ours / n:.2f} ms, ours fp32 {tot_32 / n:.2f} ms",
          end="")
    if rs:
        print(f", resemblyzer {tot_rs / n:.2f} ms -> speedup {tot_rs / tot_ours:.2f}x ({tot_rs / tot_32:.2f}x fp32)")
    else:
        print()
    print(f"parity vs golden: min cosine model_only {worst_model:.6f} (need >= 0.999), "
          f"pipeline {worst_pipe:.6f} (need >= 0.99)")
    same = [cosine(embeds[a], embeds[b]) for a, b in (("allison_a.wav", "allison_b.flac"),
                                                      ("carlo_a.wav", "carlo_b.ogg"), ("june_a.wav", "june_b.wav"))]
    diff = [cosine(embeds[a], embeds[b]) for i, a in enumerate(CLIPS) for b in CLIPS[i + 1:]
            if a.split("_")[0] != b.split("_")[0]]
    print(f"same-speaker cosine min {min(same):.4f}, different-speaker max {max(diff):.4f}")

    if rs:
        _explain(ours, ours32, rs, pre["allison_a.wav"], args.repeats)
    return 0


def _explain(ours: SpeakerEncoder, ours32: SpeakerEncoder, rs: tuple[Any, Any, Any], wav: np.ndarray, repeats: int) -> None:
    """Where resemblyzer's time goes, so the speedup is not taken on faith."""
    enc, rs_audio, _ = rs
    _, mel_slices = enc.compute_partial_slices(len(wav), 1.3, 0.75)
    padded = np.pad(wav, (0, max(0, mel_slices[-1].stop * 160 - len(wav))))
    mel = rs_audio.wav_to_mel_spectrogram(padded)
    batch = torch.from_numpy(np.array([mel[s] for s in mel_slices]))
    with torch.no_grad():
        t_model = _median_ms(lambda: enc(batch), repeats)
    t_mel = _median_ms(lambda: rs_audio.wav_to_mel_spectrogram(padded), repeats)
    print(f"\nbreakdown (allison_a, {len(mel_slices)} partials): resemblyzer librosa mel {t_mel:.2f} ms, "
          f"its model forward alone {t_model:.2f} ms")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    # librosa's numpy BLAS call leaves OpenBLAS worker threads spinning, which then fight
    # torch's OpenMP threads for the cores during the LSTM. Show resemblyzer without that.
    with threadpool_limits(limits=1, user_api="blas"):
        t_rs1 = _median_ms(lambda: enc.embed_utterance(wav), repeats)
        t_ours1 = _median_ms(lambda: ours.embed(wav, preprocess=False), repeats)
        t_321 = _median_ms(lambda: ours32.embed(wav, preprocess=False), repeats)
    print(f"with numpy's BLAS limited to 1 thread (threadpoolctl): resemblyzer {t_rs1:.2f} ms, "
          f"ours ({ours.precision}) {t_ours1:.2f} ms -> {t_rs1 / t_ours1:.2f}x, ours fp32 {t_321:.2f} ms "
          f"-> {t_rs1 / t_321:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
