"""GE2E speaker encoder: parity with resemblyzer 0.1.4 golden embeddings, front end, errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from voiced.encoder import (
    EMBEDDING_DIM,
    MIN_SAMPLES,
    MelFrontEnd,
    SpeakerEncoder,
    WeightsNotFoundError,
    cosine,
    locate_weights,
    long_silence_mask,
    mel_filterbank,
    partial_starts,
    preprocess_wav,
    resolve_device,
    resolve_precision,
    trim_long_silences,
)
from voiced.errors import AudioError, ConfigError

CLIPS = ["allison_a.wav", "allison_b.flac", "carlo_a.wav", "carlo_b.ogg", "june_a.wav", "june_b.wav"]


def _speaker(name: str) -> str:
    return name.split("_")[0]


@pytest.fixture(scope="module")
def raw_wavs(testdata_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in CLIPS:
        wav, sr = sf.read(testdata_dir / "voices" / name, dtype="float32")
        assert sr == 16000
        out[name] = wav
    return out


@pytest.fixture(scope="module")
def pipeline_embeds(speaker_encoder: SpeakerEncoder, raw_wavs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: speaker_encoder.embed(wav) for name, wav in raw_wavs.items()}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", CLIPS)
def test_model_only_parity(speaker_encoder: SpeakerEncoder, raw_wavs: dict[str, np.ndarray],
                           golden: dict[str, Any], name: str) -> None:
    ours = speaker_encoder.embed(raw_wavs[name], preprocess=False)
    assert cosine(ours, np.array(golden[name]["model_only"])) >= 0.999


@pytest.mark.parametrize("name", CLIPS)
def test_pipeline_parity(pipeline_embeds: dict[str, np.ndarray], golden: dict[str, Any], name: str) -> None:
    assert cosine(pipeline_embeds[name], np.array(golden[name]["pipeline"])) >= 0.99


def test_fp32_is_exact_to_reference(raw_wavs: dict[str, np.ndarray], golden: dict[str, Any]) -> None:
    enc = SpeakerEncoder(device="cpu", precision="fp32")
    assert enc.precision == "fp32"
    for name in ("allison_b.flac", "june_b.wav"):
        assert cosine(enc.embed(raw_wavs[name], preprocess=False), np.array(golden[name]["model_only"])) > 0.99999
        assert cosine(enc.embed(raw_wavs[name]), np.array(golden[name]["pipeline"])) > 0.99999


def test_precision_option() -> None:
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("int8", torch.device("cpu"))


def test_same_speaker_scores_above_every_different_speaker_pair(pipeline_embeds: dict[str, np.ndarray]) -> None:
    same, different = [], []
    for a, b in itertools.combinations(CLIPS, 2):
        (same if _speaker(a) == _speaker(b) else different).append(cosine(pipeline_embeds[a], pipeline_embeds[b]))
    assert len(same) == 3 and len(different) == 12
    assert min(same) > max(different)


def test_embedding_shape_and_norm(pipeline_embeds: dict[str, np.ndarray]) -> None:
    for emb in pipeline_embeds.values():
        assert emb.shape == (EMBEDDING_DIM,) and emb.dtype == np.float32
        assert math.isclose(float(np.linalg.norm(emb)), 1.0, rel_tol=1e-5)
        assert (emb >= 0).all()  # ReLU before normalisation


def test_embed_file_matches_embed(speaker_encoder: SpeakerEncoder, testdata_dir: Path,
                                  pipeline_embeds: dict[str, np.ndarray]) -> None:
    emb = speaker_encoder.embed_file(testdata_dir / "voices" / "carlo_b.ogg")
    assert cosine(emb, pipeline_embeds["carlo_b.ogg"]) > 0.99999
    short = speaker_encoder.embed_file(testdata_dir / "voices" / "carlo_b.ogg", max_duration_s=6.0)
    assert cosine(short, emb) > 0.9


# ----------------------------------------------------------------------------- front end


def test_filterbank_against_librosa() -> None:
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=400, n_mels=40)
    ours = mel_filterbank()
    assert ours.shape == ref.shape == (40, 201)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_mel_spectrogram_against_librosa(raw_wavs: dict[str, np.ndarray]) -> None:
    librosa = pytest.importorskip("librosa")
    wav = raw_wavs["june_a.wav"][:40000]
    ref = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=160, n_mels=40,
                                         pad_mode="constant").T
    ours = MelFrontEnd(torch.device("cpu"))(torch.from_numpy(wav)).numpy()
    assert ours.shape == ref.shape == (1 + len(wav) // 160, 40)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6 * float(ref.max()))


def test_filterbank_properties() -> None:
    fb = mel_filterbank()
    assert fb.dtype == np.float32 and fb.shape == (40, 201)
    assert (fb >= 0).all() and (fb.max(axis=1) > 0).all()  # no empty band
    assert not fb.flags.writeable  # cached: must not be mutated by callers
    assert mel_filterbank() is fb


def test_mel_frames_match_centred_stft_count() -> None:
    fe = MelFrontEnd(torch.device("cpu"))
    for n in (400, 16000, 16159, 16160):
        assert fe(torch.zeros(n)).shape == (1 + n // 160, 40)


# ----------------------------------------------------------------------------- slicing


@pytest.mark.parametrize(
    ("n_samples", "expected"),
    [
        (192000, [77 * i for i in range(15)]),  # 12 s: the golden clips
        (16000 * 2, [0, 77]),  # 2 s: second window 0.45 s past the end is still >= 75 % covered
        (MIN_SAMPLES, [0]),
        (0, [0]),
    ],
)
def test_partial_starts(n_samples: int, expected: list[int]) -> None:
    assert partial_starts(n_samples) == expected


def test_partial_starts_match_resemblyzer() -> None:
    voice_encoder = pytest.importorskip("resemblyzer.voice_encoder")
    for n in (0, 100, 19200, 25600, 32000, 40000, 123457, 189600, 192000):
        _, mel_slices = voice_encoder.VoiceEncoder.compute_partial_slices(n, 1.3, 0.75)
        assert partial_starts(n) == [s.start for s in mel_slices], n


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_reference_length(raw_wavs: dict[str, np.ndarray]) -> None:
    # carlo_a and june_b lose 0.15 s / 0.12 s of silence in the reference pipeline.
    assert len(preprocess_wav(raw_wavs["carlo_a.wav"])) == 11.85 * 16000
    assert len(preprocess_wav(raw_wavs["june_b.wav"])) == 11.88 * 16000


def test_preprocess_raises_quiet_audio_to_minus_30_dbfs(raw_wavs: dict[str, np.ndarray]) -> None:
    quiet = raw_wavs["allison_a.wav"] * 0.01
    out = preprocess_wav(quiet)
    rms_db = 20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2)))
    assert out.dtype == np.float32
    assert rms_db > -31.0


def test_trim_long_silences_removes_long_gap(raw_wavs: dict[str, np.ndarray]) -> None:
    speech = raw_wavs["june_a.wav"][:48000]
    gap = np.zeros(16000 * 2, np.float32)
    trimmed = trim_long_silences(np.concatenate([speech, gap, speech]))
    assert len(trimmed) % 480 == 0
    assert len(trimmed) < 2 * len(speech) + 0.5 * 16000  # at most ~2 x 3 windows of the gap kept
    mask = long_silence_mask(np.concatenate([speech, gap, speech]))
    assert mask.dtype == bool and mask.sum() == len(trimmed)
    assert mask[: len(speech) - 16000].all() and not mask[len(speech) + 8000 : len(speech) + 24000].any()


def test_silence_raises_no_speech(speaker_encoder: SpeakerEncoder) -> None:
    with pytest.raises(AudioError, match="no speech found"):
        speaker_encoder.embed(np.zeros(16000 * 3, np.float32))
    with pytest.raises(AudioError, match="no speech found"):
        speaker_encoder.embed(np.zeros(16000 * 3, np.float32), preprocess=False)
    # Faint steady hum: no speech for the VAD, so trimming leaves nothing.
    hum = (1e-4 * np.sin(np.arange(16000 * 3) * 2 * np.pi * 50 / 16000)).astype(np.float32)
    with pytest.raises(AudioError, match="no speech found"):
        speaker_encoder.embed(hum)


def test_too_short_raises_no_speech(speaker_encoder: SpeakerEncoder, raw_wavs: dict[str, np.ndarray]) -> None:
    with pytest.raises(AudioError, match="no speech found"):
        speaker_encoder.embed(raw_wavs["allison_a.wav"][: MIN_SAMPLES - 1], preprocess=False)
    emb = speaker_encoder.embed(raw_wavs["allison_a.wav"][:MIN_SAMPLES], preprocess=False)
    assert emb.shape == (EMBEDDING_DIM,)


def test_bad_arrays_raise_audio_error(speaker_encoder: SpeakerEncoder) -> None:
    with pytest.raises(AudioError, match="non-finite"):
        speaker_encoder.embed(np.full(32000, np.nan, np.float32))
    with pytest.raises(AudioError, match="mono"):
        speaker_encoder.embed(np.zeros((32000, 2), np.float32))


# ----------------------------------------------------------------------------- setup


def test_identity(speaker_encoder: SpeakerEncoder) -> None:
    assert speaker_encoder.model_id == "ge2e-resemblyzer"
    prefix, digest = speaker_encoder.version.split("-")
    assert prefix == "1" and len(digest) == 12 and int(digest, 16) >= 0
    assert speaker_encoder.device == torch.device("cpu")


def test_locate_weights() -> None:
    path = locate_weights()
    assert path.name == "pretrained.pt" and path.is_file()


def test_missing_weights_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"pip install --no-deps resemblyzer==0\.1\.4"):
        SpeakerEncoder(device="cpu", weights_path=tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="cannot load"):
        SpeakerEncoder(device="cpu", weights_path=bad)


def test_locate_weights_without_resemblyzer(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(WeightsNotFoundError, match="resemblyzer==0.1.4"):
        locate_weights()


def test_runtime_does_not_import_resemblyzer_or_librosa() -> None:
    import subprocess
    import sys

    code = (
        "import sys, voiced.encoder, voiced.audio; voiced.encoder.locate_weights(); "
        "bad = [m for m in ('resemblyzer', 'librosa', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "mps", "tpu:0", ""):
        with pytest.raises(ConfigError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        for want in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ConfigError, match="CUDA is not available"):
                resolve_device(want)


def test_cosine() -> None:
    a = np.array([1.0, 0.0], np.float32)
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(a, np.zeros(2)) == 0.0


# ----------------------------------------------------------------------------- CUDA (skipped without)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_embeddings_agree_with_cpu_and_reference(raw_wavs: dict[str, np.ndarray], golden: dict[str, Any],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    cpu = SpeakerEncoder(device="cpu", precision="fp32")
    gpu = SpeakerEncoder(device="cuda", precision="fp32")
    assert "slower than fp32" not in caplog.text
    half = SpeakerEncoder(device="cuda", precision="bf16")
    assert "precision bf16 on cuda is slower than fp32" in caplog.text
    assert gpu.device.type == "cuda" and half.precision == "bf16"
    assert SpeakerEncoder(device="cuda").precision == "fp32"  # auto
    for name, wav in raw_wavs.items():
        ref = cpu.embed(wav)
        on_gpu = gpu.embed(wav)
        assert on_gpu.dtype == np.float32 and on_gpu.shape == (EMBEDDING_DIM,)
        assert cosine(on_gpu, ref) > 0.9999, name
        assert cosine(on_gpu, np.array(golden[name]["pipeline"])) > 0.999, name
        assert cosine(half.embed(wav), ref) > 0.999, name


@needs_cuda
def test_cuda_ordinals() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
