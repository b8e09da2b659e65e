"""Reading reference audio: formats, rates, channel mixing, and every bad input as AudioError."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import voiced.audio as audio_mod
from voiced.audio import SAMPLE_RATE, LoadedAudio, load_audio, voiced_fraction
from voiced.encoder import SpeakerEncoder, cosine
from voiced.errors import AudioError

CLIP = "allison_a.wav"


@pytest.fixture(scope="module")
def clip(testdata_dir: Path) -> np.ndarray:
    wav, sr = sf.read(testdata_dir / "voices" / CLIP, dtype="float32")
    assert sr == SAMPLE_RATE
    return wav


def _resample(wav: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(wav, SAMPLE_RATE, rate, quality="VHQ").astype(np.float32)


# ----------------------------------------------------------------------------- good files


def test_reads_16k_wav_exactly(testdata_dir: Path, tmp_path: Path, clip: np.ndarray) -> None:
    path = tmp_path / CLIP
    shutil.copy(testdata_dir / "voices" / CLIP, path)
    got = load_audio(path)
    assert isinstance(got, LoadedAudio)
    assert got.samples.dtype == np.float32 and got.samples.ndim == 1
    np.testing.assert_array_equal(got.samples, clip)  # no resampling at the native rate
    assert (got.sample_rate, got.source_sample_rate, got.channels, got.truncated) == (16000, 16000, 1, False)
    assert got.duration_s == got.source_duration_s == pytest.approx(12.0)


@pytest.mark.parametrize(("name", "subtype"), [("a.flac", "PCM_16"), ("a.ogg", "VORBIS"), ("a.mp3", "MPEG_LAYER_III")])
def test_compressed_formats(tmp_path: Path, clip: np.ndarray, name: str, subtype: str) -> None:
    path = tmp_path / name
    if name.endswith(".mp3") and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    sf.write(path, clip, SAMPLE_RATE, subtype=subtype)
    got = load_audio(path)
    assert got.source_sample_rate == SAMPLE_RATE
    # Codec delay/padding may shift the length a little.
    assert abs(got.duration_s - 12.0) < 0.1
    assert got.samples.dtype == np.float32


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resamples_to_16k(tmp_path: Path, clip: np.ndarray, rate: int) -> None:
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, _resample(clip, rate), rate, subtype="FLOAT")
    got = load_audio(path)
    assert got.sample_rate == SAMPLE_RATE and got.source_sample_rate == rate
    assert abs(len(got.samples) - len(clip)) <= 2
    if rate >= 16000:  # band-limited round trip: close to the original
        n = min(len(got.samples), len(clip))
        err = np.sqrt(np.mean((got.samples[:n] - clip[:n]) ** 2)) / np.sqrt(np.mean(clip**2))
        assert err < 0.05


def test_other_output_rate(tmp_path: Path, clip: np.ndarray) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, clip, SAMPLE_RATE)
    got = load_audio(path, sample_rate=24000)
    assert got.sample_rate == 24000 and len(got.samples) == pytest.approx(1.5 * len(clip), abs=2)


def test_stereo_441_is_mixed_and_embeds_like_original(
    tmp_path: Path, clip: np.ndarray, speaker_encoder: SpeakerEncoder
) -> None:
    up = _resample(clip, 44100)
    stereo = np.stack([up * 0.9, up * 0.5], axis=1)  # unequal channels: mean is 0.7 x
    path = tmp_path / "stereo44k.wav"
    sf.write(path, stereo, 44100, subtype="PCM_24")
    got = load_audio(path)
    assert got.channels == 2 and got.source_sample_rate == 44100
    n = min(len(got.samples), len(clip))
    np.testing.assert_allclose(got.samples[:n].std(), 0.7 * clip[:n].std(), rtol=0.02)
    assert cosine(speaker_encoder.embed(got.samples), speaker_encoder.embed(clip)) >= 0.98
    assert cosine(speaker_encoder.embed_file(path), speaker_encoder.embed(clip)) >= 0.98


def test_max_duration_reads_only_the_start(tmp_path: Path, clip: np.ndarray) -> None:
    path = tmp_path / "a48k.flac"
    sf.write(path, _resample(clip, 48000), 48000)
    got = load_audio(path, max_duration_s=3.5)
    assert got.truncated and got.source_duration_s == pytest.approx(12.0, abs=0.01)
    assert got.duration_s == pytest.approx(3.5, abs=0.01)
    whole = load_audio(path, max_duration_s=60)
    assert not whole.truncated and whole.duration_s == pytest.approx(12.0, abs=0.01)


def test_max_duration_does_not_decode_the_rest(tmp_path: Path, clip: np.ndarray,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, clip, SAMPLE_RATE)
    asked: list[int] = []
    real_read = sf.SoundFile.read

    def spy(self: sf.SoundFile, frames: int = -1, *args: object, **kwargs: object) -> np.ndarray:
        asked.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    load_audio(path, max_duration_s=1.0)
    assert asked == [16000]


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_audio(tmp_path / "x.wav", max_duration_s=0)
    with pytest.raises(ValueError):
        load_audio(tmp_path / "x.wav", sample_rate=100)


# ----------------------------------------------------------------------------- bad files


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load_audio(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="file disappeared while reading"):
        load_audio(tmp_path / "gone.wav")


def test_file_deleted_mid_read(tmp_path: Path, clip: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, clip, SAMPLE_RATE)
    real_open = open

    def open_after_delete(file: os.PathLike[str], *args: object, **kwargs: object) -> object:
        os.unlink(file)  # stat succeeded, then the watcher's file vanished
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(audio_mod, "open", open_after_delete, raising=False)
    with pytest.raises(AudioError, match="file disappeared while reading"):
        load_audio(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_unreadable_permissions(tmp_path: Path, clip: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, clip, SAMPLE_RATE)
    path.chmod(0)
    try:
        if os.geteuid() == 0:  # root ignores modes: simulate what open() would raise
            def denied(file: object, *args: object, **kwargs: object) -> object:
                raise PermissionError(13, "Permission denied", str(file))

            monkeypatch.setattr(audio_mod, "open", denied, raising=False)
        with pytest.raises(AudioError, match="permission denied"):
            load_audio(path)
    finally:
        path.chmod(0o644)


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("these are not the samples you are looking for\n" * 20)
    with pytest.raises(AudioError, match="unsupported or corrupt audio format"):
        load_audio(path)


def test_corrupt_flac(tmp_path: Path, clip: np.ndarray) -> None:
    path = tmp_path / "a.flac"
    sf.write(path, clip, SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    data[200:] = os.urandom(len(data) - 200)  # keep the header, destroy the frames
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match="corrupt or truncated audio data in a.flac"):
        load_audio(path)


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3"])
def test_truncated_file_is_refused(tmp_path: Path, clip: np.ndarray, suffix: str) -> None:
    if suffix == ".mp3" and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    path = tmp_path / f"a{suffix}"
    sf.write(path, clip, SAMPLE_RATE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy still in progress
    with pytest.raises(AudioError, match="truncated"):
        load_audio(path)


@pytest.mark.parametrize("suffix", [".ogg"])
def test_truncated_stream_formats_yield_what_is_there(tmp_path: Path, clip: np.ndarray, suffix: str) -> None:
    # Ogg carries no total length: libsndfile counts the pages present, so a cut file is
    # indistinguishable from a shorter one and is read as such.
    path = tmp_path / f"a{suffix}"
    sf.write(path, clip, SAMPLE_RATE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = load_audio(path)
    assert 3.0 < got.duration_s < 9.0 and not got.truncated


def test_truncated_wav_refused_even_with_max_duration(tmp_path: Path, clip: np.ndarray) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, clip, SAMPLE_RATE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"truncated file: a\.wav header promises 12\.00 s"):
        load_audio(path, max_duration_s=2.0)  # the header check still applies to WAV


def test_non_finite_samples(tmp_path: Path, clip: np.ndarray) -> None:
    bad = clip.copy()
    bad[1000] = np.nan
    bad[2000] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, bad, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="non-finite samples"):
        load_audio(path)


@pytest.mark.parametrize("rate", [4000, 7999, 192001, 384000])
def test_sample_rate_out_of_range(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, np.zeros(rate // 10, np.float32), rate)
    with pytest.raises(AudioError, match=f"sample rate {rate} Hz out of range"):
        load_audio(path)


def test_header_only_wav_has_no_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="no audio in file"):
        load_audio(path)


def test_no_other_exception_type_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clip: np.ndarray) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, clip, 44100)

    def boom(*args: object, **kwargs: object) -> np.ndarray:
        raise RuntimeError("resampler exploded")

    monkeypatch.setattr(audio_mod.soxr, "resample", boom)
    with pytest.raises(AudioError, match="cannot read audio file a.wav: resampler exploded"):
        load_audio(path)


def test_voiced_fraction_tells_speech_from_noise_and_hum(testdata_dir: Path) -> None:
    for path in sorted((testdata_dir / "voices").iterdir()):
        assert voiced_fraction(load_audio(path).samples) > 0.6, path.name
    rng = np.random.default_rng(0)
    white = rng.standard_normal(SAMPLE_RATE * 3)
    t = np.arange(SAMPLE_RATE * 3) / SAMPLE_RATE
    pink = np.fft.irfft(np.fft.rfft(white) / np.sqrt(np.maximum(np.arange(len(white) // 2 + 1), 1)), len(white))
    brown = np.cumsum(white)
    for name, sound in {"white": white, "pink": pink, "brown": brown - brown.mean(), "hum": np.sin(2 * np.pi * 50 * t)}.items():
        assert voiced_fraction(sound) < 0.05, name
    assert voiced_fraction(np.zeros(SAMPLE_RATE)) == 0.0
    assert voiced_fraction(np.zeros(10)) == 0.0  # shorter than one frame
