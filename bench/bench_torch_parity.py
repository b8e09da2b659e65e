"""Parity of Kokoro's torch backend with onnxruntime: 20 sentences x the five base voices.

    python bench/bench_torch_parity.py [--sentences N] [--voices a,b] [--no-wer]

For each pair it synthesises the same tokens, style, speed and pitch with both backends and
prints the totals' duration difference (in frames of 600 samples; target within 2), the GE2E
speaker cosine between the two outputs (target >= 0.97), the mean absolute log-mel difference
(80 mels, target <= 2.5 dB), then the word error rate of each backend's speech as Whisper base
hears it (torch no worse) and the CPU time of each. Samples cannot match (see the torch network's
notes: the harmonic source's phase integrates an F0 that int8 arithmetic moves by a few Hz).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judges import Whisper, log_mel_distance, word_errors  # noqa: E402
from machine import describe  # noqa: E402

from voiced.engines.kokoro import KokoroEngine  # noqa: E402
from voiced.engines.kokoro.post import resample_24k_to_16k  # noqa: E402

FRAME = 600  # samples per predicted duration frame at 24 kHz

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells seashells by the seashore every summer morning.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A rainbow is a division of white light into many beautiful colors.",
    "The train to Edinburgh leaves from platform nine at a quarter past seven.",
    "Could you tell me where the nearest pharmacy is, please?",
    "We measured the temperature every hour for three days.",
    "His voice was calm, but his hands were shaking.",
    "The library closes early on Sundays and public holidays.",
    "After the storm, the fishermen repaired their nets on the beach.",
    "Nobody expected the meeting to last until midnight.",
    "Turn left at the second traffic light and park behind the bakery.",
    "The orchestra played a quiet piece before the interval.",
    "Fresh bread, cheese and a few ripe tomatoes make a fine lunch.",
    "The children built a small bridge across the stream.",
    "Our flight was delayed because of fog over the mountains.",
    "Reading a good book is like having a long conversation with a friend.",
    "The museum opened a new exhibition about ancient maps.",
    "Keep the receipt in case you need to return the jacket.",
    "Every autumn the geese fly south in long uneven lines.",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=len(SENTENCES))
    parser.add_argument("--voices", default="", help="comma-separated base voices (default: all five)")
    parser.add_argument("--no-wer", action="store_true", help="skip the Whisper transcriptions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(describe())

    from voiced.encoder import SpeakerEncoder

    cache = Path(tempfile.mkdtemp(prefix="voiced-parity-"))
    engines = {}
    for name in ("onnx", "torch"):
        t0 = time.perf_counter()
        engines[name] = KokoroEngine(cache, backend=name, threads=args.threads)
        engines[name].load("cpu")
        print(f"{name}: loaded in {time.perf_counter() - t0:.1f}s (first load extracts/edits the model)")
    onnx, torch_ = engines["onnx"], engines["torch"]
    voices = [v for v in args.voices.split(",") if v] or sorted(onnx.voices)
    sentences = SENTENCES[: args.sentences]
    encoder = SpeakerEncoder()
    whisper = None if args.no_wer else Whisper(threads=args.threads)

    rows = []
    cpu = {"onnx": 0.0, "torch": 0.0}
    audio_s = 0.0
    errors = {"onnx": [0, 0], "torch": [0, 0]}
    for voice in voices:
        pack = onnx.voices[voice]
        for text in sentences:
            pieces = onnx.phonemize(text)
            out = {}
            for name, eng in engines.items():
                t0 = time.process_time()
                out[name] = np.concatenate([eng.infer(eng.tokens(ps), pack) for ps in pieces])
                cpu[name] += time.process_time() - t0
            a, b = out["onnx"], out["torch"]
            audio_s += len(a) / 24_000
            ea, eb = encoder.embed(a), encoder.embed(b)
            cos = float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
            row = {"voice": voice, "frames": (len(b) - len(a)) / FRAME, "cos": cos, "mel": log_mel_distance(a, b),
                   "mel_raw": log_mel_distance(a, b, align=False), "text": text}
            if whisper is not None:
                for name, wav in out.items():
                    e, n = word_errors(text, whisper.transcribe(resample_24k_to_16k(wav)))
                    errors[name][0] += e
                    errors[name][1] += n
            rows.append(row)
        vr = [r for r in rows if r["voice"] == voice]
        print(f"{voice:14s} frames {min(r['frames'] for r in vr):+.0f}..{max(r['frames'] for r in vr):+.0f}  "
              f"cosine {min(r['cos'] for r in vr):.3f}-{max(r['cos'] for r in vr):.3f} "
              f"(mean {np.mean([r['cos'] for r in vr]):.3f})  "
              f"log-mel (DTW) {min(r['mel'] for r in vr):.2f}-{max(r['mel'] for r in vr):.2f} dB")

    frames = [abs(r["frames"]) for r in rows]
    cosines = [r["cos"] for r in rows]
    mels = [r["mel"] for r in rows]
    raws = [r["mel_raw"] for r in rows]
    print(f"\n{len(rows)} pairs ({len(sentences)} sentences x {len(voices)} voices, {audio_s:.0f} s of audio each):")
    print(f"  total duration difference: max {max(frames):.0f} frames, {sum(f > 2 for f in frames)} pairs over 2 "
          f"(target: within 2)")
    print(f"  GE2E cosine torch vs onnx: min {min(cosines):.3f}, mean {np.mean(cosines):.3f} (target >= 0.97)")
    print(f"  log-mel mean abs difference, frames paired by DTW: max {max(mels):.2f} dB, mean {np.mean(mels):.2f} dB "
          f"(target <= 2.5); frame by frame without pairing: max {max(raws):.2f}, mean {np.mean(raws):.2f} dB")
    for r in rows:
        if abs(r["frames"]) > 2 or r["cos"] < 0.97 or r["mel"] > 2.5:
            print(f"    off target: {r['voice']} {r['text']!r}: {r['frames']:+.0f} frames, cosine {r['cos']:.3f}, "
                  f"log-mel {r['mel']:.2f} dB")
    if whisper is not None:
        for name in ("onnx", "torch"):
            e, n = errors[name]
            print(f"  WER {name}: {e}/{n} = {100 * e / max(n, 1):.1f}% (Whisper base, int8, beam 5)")
    for name in ("onnx", "torch"):
        print(f"  CPU time {name}: {cpu[name]:.1f} s for {audio_s:.0f} s of audio "
              f"(CPU-seconds per audio-second {cpu[name] / audio_s:.3f}, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
