"""Encode synthesized audio for the wire: wav, flac, ogg (vorbis/opus), mp3 or raw PCM.

:class:`AudioWriter` takes float32 chunks as the engine yields them and returns the encoded
bytes available so far, so the same code serves whole replies and streams; resampling to a
requested rate is done on the fly (soxr's streaming resampler keeps chunk borders seamless).
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

# format -> (soundfile container, subtype)
_CONTAINERS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
RAW_FORMATS = ("pcm_s16le", "pcm_f32le")


class AudioWriter:
    """Incremental encoder: ``feed(chunk) -> bytes``, then ``finish() -> bytes``."""

    def __init__(self, fmt: str, input_rate: int, output_rate: int | None = None) -> None:
        if fmt not in _CONTAINERS and fmt not in RAW_FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}")
        self.format = fmt
        self.input_rate = input_rate
        self.sample_rate = output_rate or input_rate
        self.frames = 0
        self._resampler = (
            soxr.ResampleStream(input_rate, self.sample_rate, 1, dtype="float32", quality="HQ")
            if self.sample_rate != input_rate
            else None
        )
        self._buffer: io.BytesIO | None = None
        self._file: sf.SoundFile | None = None
        self._sent = 0
        # wav, flac and mp3 rewrite their headers when closed: their bytes are only final then
        self._incremental = fmt in ("ogg", "opus")
        if fmt in _CONTAINERS:
            container, subtype = _CONTAINERS[fmt]
            if fmt == "opus" and self.sample_rate not in (8000, 12000, 16000, 24000, 48000):
                raise ValueError("opus needs a sample rate of 8000, 12000, 16000, 24000 or 48000")
            self._buffer = io.BytesIO()
            self._file = sf.SoundFile(
                self._buffer, mode="w", samplerate=self.sample_rate, channels=1, format=container, subtype=subtype
            )

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    def feed(self, chunk: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        return self._encode(samples)

    def finish(self) -> bytes:
        tail = b""
        if self._resampler is not None:
            tail = self._encode(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        if self._file is not None:
            self._file.close()
            self._file = None
            return tail + self._take()
        return tail

    def close(self) -> None:
        """Let go of an encoder abandoned before :meth:`finish` (a failed request): the container
        is closed while its buffer is still open, not later by the garbage collector."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _encode(self, samples: np.ndarray) -> bytes:
        self.frames += len(samples)
        if self.format == "pcm_f32le":
            return samples.astype("<f4").tobytes()
        if self.format == "pcm_s16le":
            return _to_int16(samples).astype("<i2").tobytes()
        assert self._file is not None
        if len(samples):
            self._file.write(samples)
        return self._take() if self._incremental else b""

    def _take(self) -> bytes:
        """Bytes the container has produced since the last call (ogg pages, flac frames...)."""
        assert self._buffer is not None
        data = self._buffer.getvalue()
        fresh, self._sent = data[self._sent :], len(data)
        return fresh


def _to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)
