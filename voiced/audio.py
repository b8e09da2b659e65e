"""Reading reference recordings: any format soundfile reads, mixed to mono, resampled with soxr.

Every problem with the file itself surfaces as :class:`voiced.errors.AudioError` with a one-line,
human-readable message (it ends up in the voice's ``error`` field).

Truncated files: libsndfile silently clamps a WAV whose header promises more audio than the file
holds, and may return short reads for compressed formats. A watched folder sees files while they
are still being copied, so a truncated file is *refused* ("truncated file ... still being
copied?") rather than half-used; the next change event retries it once the copy is complete.
WAV truncation is found from the RIFF header wherever it is (even past ``max_duration_s``);
A FLAC or MP3 (Xing/LAME header) that is cut short fails to decode or decodes short, and is
refused too. Ogg declares no total length (libsndfile counts the pages present), so a cut Ogg
file reads as a shorter one.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from voiced.errors import AudioError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SOURCE_RATE = 8000
MAX_SOURCE_RATE = 192000
# Compressed formats may report a frame count that is an estimate; tolerate this much shortfall.
_SHORT_READ_TOLERANCE_S = 0.1
_RESAMPLE_QUALITY = "HQ"


@dataclass(frozen=True)
class LoadedAudio:
    """Decoded audio plus what we learnt about its source."""

    samples: np.ndarray  # float32 mono at the requested rate
    sample_rate: int
    duration_s: float  # duration of what was returned
    source_duration_s: float  # full duration of the file
    source_sample_rate: int
    channels: int  # of the source
    truncated: bool  # True when max_duration_s cut it


def load_audio(
    path: str | os.PathLike[str],
    sample_rate: int = SAMPLE_RATE,
    max_duration_s: float | None = None,
) -> LoadedAudio:
    """Read ``path`` as float32 mono at ``sample_rate``, at most ``max_duration_s`` seconds of it.

    Raises AudioError for any unusable file; ValueError only for invalid arguments.
    """
    if not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE:
        raise ValueError(f"sample_rate must be within {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz")
    if max_duration_s is not None and not (max_duration_s > 0 and math.isfinite(max_duration_s)):
        raise ValueError("max_duration_s must be a positive number of seconds")
    path = Path(path)
    try:
        return _load(path, sample_rate, max_duration_s)
    except AudioError:
        raise
    except FileNotFoundError:
        raise AudioError(f"file disappeared while reading: {path}") from None
    except PermissionError:
        raise AudioError(f"permission denied: cannot read {path}") from None
    except IsADirectoryError:
        raise AudioError(f"is a directory, not an audio file: {path}") from None
    except sf.SoundFileError as exc:
        raise AudioError(f"corrupt or unsupported audio file {path.name}: {_sf_reason(exc)}") from None
    except MemoryError:
        raise AudioError(f"audio file too large to decode: {path}") from None
    except Exception as exc:  # noqa: BLE001 - the contract is "AudioError and nothing else"
        log.debug("unexpected error reading %s", path, exc_info=True)
        raise AudioError(f"cannot read audio file {path.name}: {exc}") from None


def _load(path: Path, sample_rate: int, max_duration_s: float | None) -> LoadedAudio:
    st = os.stat(path)  # FileNotFoundError / PermissionError are mapped by the caller
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(f"is a directory, not an audio file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(f"not a regular file: {path}")
    if st.st_size == 0:
        raise AudioError(f"empty file: {path.name} has 0 bytes")

    # Open once and hand the descriptor to libsndfile: a rename/delete after this point cannot
    # make the header and the data come from different files.
    with open(path, "rb") as fh:
        try:
            snd = sf.SoundFile(fh)
        except sf.SoundFileError as exc:
            raise AudioError(
                f"unsupported or corrupt audio format: {path.name} ({_sf_reason(exc)})"
            ) from None
        with snd:
            src_rate = int(snd.samplerate)
            channels = int(snd.channels)
            frames = int(snd.frames)
            fmt = str(snd.format)
            if not MIN_SOURCE_RATE <= src_rate <= MAX_SOURCE_RATE:
                raise AudioError(
                    f"sample rate {src_rate} Hz out of range "
                    f"({MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz): {path.name}"
                )
            if channels < 1:
                raise AudioError(f"no audio channels in {path.name}")
            if frames <= 0:
                raise AudioError(f"no audio in file: {path.name} contains 0 samples")
            if fmt in ("WAV", "WAVEX"):
                declared = _declared_wav_frames(fh, st.st_size, channels, snd.subtype)
                if declared is not None and declared > frames:
                    raise AudioError(
                        f"truncated file: {path.name} header promises {declared / src_rate:.2f} s "
                        f"but only {frames / src_rate:.2f} s are present (still being copied?)"
                    )
            wanted = frames
            if max_duration_s is not None:
                wanted = min(frames, max(1, math.ceil(max_duration_s * src_rate)))
            try:
                data = snd.read(wanted, dtype="float32", always_2d=True)
            except sf.SoundFileError as exc:
                raise AudioError(f"corrupt or truncated audio data in {path.name}: {_sf_reason(exc)}") from None

    got = data.shape[0]
    if got == 0:
        raise AudioError(f"no audio could be decoded from {path.name} (corrupt file?)")
    if wanted - got > _SHORT_READ_TOLERANCE_S * src_rate:
        raise AudioError(
            f"truncated file: {path.name} should hold {wanted / src_rate:.2f} s "
            f"but only {got / src_rate:.2f} s could be decoded (still being copied?)"
        )
    # Mean over channels, as the spec says; float32 throughout to keep memory small.
    mono = data.mean(axis=1, dtype=np.float32) if channels > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"non-finite samples (NaN or infinity) in {path.name}")
    if src_rate != sample_rate:
        mono = resample(mono, src_rate, sample_rate)
    samples = np.ascontiguousarray(mono, dtype=np.float32)
    return LoadedAudio(
        samples=samples,
        sample_rate=sample_rate,
        duration_s=len(samples) / sample_rate,
        source_duration_s=frames / src_rate,
        source_sample_rate=src_rate,
        channels=channels,
        truncated=got < frames,
    )


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling (soxr, high quality), float32 in and out."""
    return soxr.resample(np.asarray(samples, np.float32), src_rate, dst_rate, quality=_RESAMPLE_QUALITY).astype(
        np.float32, copy=False)


def _declared_wav_frames(fh: BinaryIO, file_size: int, channels: int, subtype: str) -> int | None:
    """Frames the RIFF ``data`` chunk claims to hold, or None when unknown/not checkable."""
    bits = {"PCM_U8": 8, "PCM_S8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32,
            "FLOAT": 32, "DOUBLE": 64, "ULAW": 8, "ALAW": 8}.get(subtype)
    if bits is None:  # ADPCM and friends: block sizes make the arithmetic format specific
        return None
    pos = fh.tell()
    try:
        fh.seek(0)
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= file_size:
            fh.seek(offset)
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                # Streaming writers leave 0 or 0xFFFFFFFF when the length is unknown.
                if size == 0 or size >= 0xFFFFFFF0:
                    return None
                return size // (channels * bits // 8)
            offset += 8 + size + (size & 1)
        return None
    finally:
        fh.seek(pos)


def _sf_reason(exc: Exception) -> str:
    """libsndfile's own words, without the 'Error opening <path>:' prefix."""
    msg = str(exc)
    return msg.split(": ", 1)[1] if msg.startswith("Error opening") and ": " in msg else msg


def voiced_fraction(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Share of the sounding 40 ms frames that are voiced: periodic with a pitch of 60-400 Hz.

    A frame is voiced when its normalised autocorrelation has a local peak above 0.5 at a lag
    inside that range; a lag at the range's edge does not count, so the slow, monotonic
    correlation of low-pass noise or a 50 Hz hum is not taken for a voice. Frames more than
    40 dB below the loud ones are left out. Speech reads 0.6-0.9; white, pink and brown noise
    0.0-0.03.
    """
    wav = np.asarray(samples, dtype=np.float64).reshape(-1)
    frame, hop = int(0.04 * sample_rate), int(0.02 * sample_rate)
    n = (len(wav) - frame) // hop + 1
    if n <= 0:
        return 0.0
    frames = wav[np.arange(frame)[None, :] + hop * np.arange(n)[:, None]]
    frames -= frames.mean(axis=1, keepdims=True)
    energy = np.square(frames).sum(axis=1)
    sounding = energy > max(1e-10, float(np.percentile(energy, 90)) * 1e-4)
    if not sounding.any():
        return 0.0
    frames = frames[sounding]
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames * np.hanning(frame), 2 * frame)) ** 2)[:, :frame]
    ac /= np.maximum(ac[:, :1], 1e-20)
    lo, hi = int(sample_rate / 400), int(sample_rate / 60)
    band = ac[:, lo : hi + 1]
    at = band.argmax(axis=1)
    peak = band[np.arange(len(band)), at]
    return float(np.mean((peak > 0.5) & (at > 0) & (at < band.shape[1] - 1)))
