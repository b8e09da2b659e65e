"""The refine stage by gradient (voiced.engines.kokoro.gradfit): real weights, the real torch network.

The fit's tests count work (steps), never time, so they pass on a loaded or slow machine. Those
that fit are slow tests: a step back-propagates through the whole network (about 6 s and 3 GB
here), and the heap it leaves behind would hide the memory figures of the tests that follow.
"""

from __future__ import annotations

import numpy as np
import pytest
from fakes import TickingClock

from voiced.engines.base import ParamError
from voiced.engines.kokoro import KokoroEngine, gradfit, post

RATE = 16_000


def _read(testdata_dir, name: str) -> np.ndarray:
    import soundfile as sf

    wav, sr = sf.read(testdata_dir / "voices" / name, dtype="float32")
    assert sr == RATE
    return wav


def test_f0_track_finds_a_tone_and_nothing_in_silence():
    t = np.arange(2 * RATE) / RATE
    tone = sum(np.sin(2 * np.pi * 180.0 * k * t) / k for k in range(1, 6)).astype(np.float32)
    f0 = gradfit.f0_track(tone)
    assert len(f0) > 100 and np.median(f0) == pytest.approx(180.0, rel=0.01)
    assert len(gradfit.f0_track(np.zeros(RATE, np.float32))) == 0
    assert len(gradfit.f0_track(np.zeros(100, np.float32))) == 0


def test_f0_track_hears_a_low_voice_through_a_telephone():
    """A 110 Hz voice with its fundamental and second harmonic cut (a 300-3400 Hz line) is still
    tracked at 110 Hz, not at a harmonic."""
    from scipy.signal import butter, sosfilt

    t = np.arange(3 * RATE) / RATE
    voice = sum(np.sin(2 * np.pi * 110.0 * k * t + k) / k for k in range(1, 30))
    line = sosfilt(butter(8, (300, 3400), btype="bandpass", fs=RATE, output="sos"), voice).astype(np.float32)
    assert np.median(gradfit.f0_track(line)) == pytest.approx(110.0, rel=0.02)


def test_f0_track_on_the_test_speakers(testdata_dir):
    """Most of each reference is voiced speech with its median pitch where a speaking voice is
    (an independent tracker, pYIN, puts the medians at 188-198 Hz)."""
    for name in ("allison_a.wav", "carlo_a.wav", "june_a.wav"):
        f0 = gradfit.f0_track(_read(testdata_dir, name))
        assert len(f0) > 300, name  # 370-820 frames of about 1,200 have a period
        assert 170 <= np.median(f0) <= 220, (name, np.median(f0))


def test_f0_track_agrees_with_pyin_on_the_spread_the_fit_aims_at(testdata_dir):
    """The fit pulls the voice's mean and spread of log F0 to the reference's: they must be the
    speaker's, not the tracker's. pYIN (librosa 0.11, 60-500 Hz, ``bench/probe_f0_tracker.py``)
    measures allison_a at 91.55 +- 3.71 semitones and june_a at 90.87 +- 3.96."""
    for name, mean, spread in (("allison_a.wav", 91.55, 3.71), ("june_a.wav", 90.87, 3.96)):
        st = gradfit.semitones(gradfit.f0_track(_read(testdata_dir, name)))
        assert abs(st.mean() - mean) < 0.5 and abs(st.std() - spread) < 0.5, (name, st.mean(), st.std())


def test_reference_bandwidth_sees_the_telephone(testdata_dir):
    """Every test clip was recorded at 8 kHz: its channel ends under 4 kHz. Wideband speech-like
    noise (falling 6 dB an octave) runs to the top band."""
    import soundfile as sf

    for path in sorted((testdata_dir / "voices").iterdir()):
        wav, sr = sf.read(path, dtype="float32")
        assert gradfit.reference_bandwidth(post.band_powers(wav, sr)) == pytest.approx(post.BAND_EDGES[-5]), path.name
    noise = np.random.default_rng(0).standard_normal(4 * RATE)
    pink = np.fft.irfft(np.fft.rfft(noise) / np.sqrt(np.maximum(np.fft.rfftfreq(len(noise), 1 / RATE), 100.0)))
    assert gradfit.reference_bandwidth(post.band_powers(pink, RATE)) == gradfit.MAX_BAND_HZ


def test_switching_the_fit_refits_the_voices(tmp_path):
    """Voices are cached under the engine's version: the gradient fit's voices under a name of
    their own, the search's under the name they always had."""
    search, torch_search = KokoroEngine(tmp_path), KokoroEngine(tmp_path, backend="torch")
    gradient = KokoroEngine(tmp_path, backend="torch", fit="gradient")
    assert search.version == torch_search.version and "gradient" not in search.version
    assert gradient.version != search.version and "gradient" in gradient.version


def test_the_fit_is_one_of_two(tmp_path):
    assert KokoroEngine(tmp_path, fit="gradient").fit == "gradient"  # on onnx too: see below
    with pytest.raises(ParamError, match="fit must be one of"):
        KokoroEngine(tmp_path, backend="torch", fit="adam")


@pytest.fixture(scope="module")
def torch_engine(tmp_path_factory, speaker_encoder, kokoro_models) -> KokoroEngine:
    eng = KokoroEngine(kokoro_models(tmp_path_factory.mktemp("kokoro-torch")), backend="torch", fit="gradient",
                       encoder=speaker_encoder)
    eng.load("cpu")
    return eng


def test_a_step_hears_windows_of_every_sentence_in_turn(torch_engine, testdata_dir, speaker_encoder):
    """The decoder runs on CROP_S windows (all of a shorter sentence), CROPS_PER_STEP a step, each
    sentence once before any is heard again; the same fit draws the same windows."""
    import torch

    wav = _read(testdata_dir, "carlo_a.wav")
    fitter = torch_engine.fitter()
    tokens = fitter.tokens + fitter.tuning_tokens[:gradfit.TUNING_SENTENCES]

    def fit() -> gradfit.GradientFit:
        return gradfit.GradientFit(torch_engine.backend.net, speaker_encoder, tokens,
                                   torch_engine.voices[torch_engine.default_voice], fitter._spread,
                                   speaker_encoder.embed(wav), post.band_powers(wav, RATE), wav)

    a, b = fit(), fit()
    drawn = [a._next_sentences() for _ in range(4)]
    assert drawn == [b._next_sentences() for _ in range(4)]
    assert all(len(d) == gradfit.CROPS_PER_STEP for d in drawn)
    first_round = [i for d in drawn for i in d][:len(tokens)]
    assert sorted(first_round) == list(range(len(tokens)))
    window = round(gradfit.CROP_S * a.frame_rate)
    with torch.no_grad():
        for i in (0, 3):
            asr, f0, energy, timbre = a._prosody(a.tokens[i], a.durations[i])
            audio = a._crop(asr, f0, energy, timbre)
            frames = min(asr.shape[2], window)
            assert audio.shape[0] == frames * post.SAMPLE_RATE / a.frame_rate
            assert torch.isfinite(audio).all() and audio.square().mean().sqrt() > 0.01


def test_the_mfcc_view_tells_the_speaker_from_another(torch_engine, testdata_dir, speaker_encoder, monkeypatch):
    """The cepstral view is 0 for the reference itself and grows for another speaker's speech
    through the same telephone channel more than for the speaker's own other recording."""
    import torch

    monkeypatch.setitem(gradfit.WEIGHTS, "mfcc", 1.0)
    wav = _read(testdata_dir, "carlo_a.wav")
    fitter = torch_engine.fitter()
    fit = gradfit.GradientFit(torch_engine.backend.net, speaker_encoder, fitter.tokens,
                              torch_engine.voices[torch_engine.default_voice], fitter._spread,
                              speaker_encoder.embed(wav), post.band_powers(wav, RATE), wav)

    def view(name: str) -> float:
        with torch.no_grad():
            return float(fit._mfcc_term(torch.tensor(_read(testdata_dir, name))))

    assert view("carlo_a.wav") == pytest.approx(0.0, abs=1e-6)
    own, other = view("carlo_b.ogg"), min(view("allison_a.wav"), view("june_a.wav"))
    assert 0 < own < other, (own, other)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gradient_refine_moves_the_voice_within_its_ranges(torch_engine, testdata_dir, speaker_encoder):
    """One step: the style, pitch and in-band EQ move, out-of-band gains stay 0 dB (the voice stays
    wideband), the same input gives the same voice, and the voice speaks."""
    wav = _read(testdata_dir, "allison_a.wav")
    emb = speaker_encoder.embed(wav)
    quick = torch_engine.prepare_voice(wav, emb, stage="quick")
    shares: list[float] = []
    fitter = torch_engine.fitter()
    a = fitter.refine(emb, previous=quick, reference=wav, method="gradient", max_evals=1, clock=TickingClock(),
                      progress=shares.append)
    assert a.meta["method"] == "gradient" and a.meta["steps"] == 1 and a.meta["stage"] == "refined"
    assert set(a.meta["objective"]) == {"ge2e", "ltas", "f0", "prior"}
    assert 3000 <= a.meta["band_hz"] <= 4300
    assert a["style"].shape == quick["style"].shape and np.isfinite(a["style"]).all()
    assert not np.array_equal(a["style"], quick["style"])
    eq = np.asarray(a["eq"])
    out_of_band = post.BAND_CENTRES > a.meta["band_hz"]
    assert out_of_band.any() and (eq[out_of_band] == 0).all()
    assert not np.allclose(eq[~out_of_band], np.asarray(quick["eq"])[~out_of_band])
    assert post.MIN_GAIN_DB <= eq.min() and eq.max() <= post.MAX_GAIN_DB
    assert post.PITCH_RANGE[0] <= torch_engine.voicing(a).pitch <= post.PITCH_RANGE[1]
    assert shares and shares == sorted(shares) and shares[-1] == 1.0
    assert -1.0 <= a.meta["similarity"] <= 1.0
    b = fitter.refine(emb, previous=quick, reference=wav, method="gradient", max_evals=1, clock=TickingClock())
    assert all(np.array_equal(a[k], b[k]) for k in a) and b.meta == a.meta
    audio = torch_engine.synthesize_all("Good morning, how are you today?", a)
    assert np.isfinite(audio).all() and np.sqrt(np.mean(audio ** 2)) > 0.01


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gradient_refine_told_to_stop_keeps_the_quick_voice(torch_engine, testdata_dir, speaker_encoder):
    wav = _read(testdata_dir, "june_a.wav")
    emb = speaker_encoder.embed(wav)
    quick = torch_engine.prepare_voice(wav, emb, stage="quick")
    stopped = torch_engine.prepare_voice(wav, emb, stage="refined", previous=quick, should_stop=lambda: True)
    assert stopped.meta["method"] == "gradient" and stopped.meta["steps"] == 0
    assert np.array_equal(stopped["style"], quick["style"]) and "cut" not in stopped.meta


def test_on_onnx_the_gradient_fit_runs_through_a_torch_network_of_its_own(testdata_dir, speaker_encoder,
                                                                         kokoro_models, tmp_path):
    """The int8 graph has no gradient: the fit loads the float32 network once, and the voice it
    makes is spoken by onnxruntime."""
    from voiced.engines.kokoro.torchnet import KokoroNet

    eng = KokoroEngine(kokoro_models(tmp_path), encoder=speaker_encoder, fit="gradient")
    eng.load("cpu")
    assert eng.backend is not None and eng.backend.name == "onnx"
    net = eng.fit_network()
    assert isinstance(net, KokoroNet) and eng.fit_network() is net  # loaded once
    wav = _read(testdata_dir, "carlo_a.wav")
    emb = speaker_encoder.embed(wav)
    quick = eng.prepare_voice(wav, emb, stage="quick")
    refined = eng.fitter().refine(emb, previous=quick, reference=wav, method="gradient", max_evals=1,
                                  budget_s=3600)
    assert refined.meta["method"] == "gradient" and refined.meta["steps"] == 1
    assert not np.array_equal(refined["style"], quick["style"])  # the step moved the voice
    audio = eng.synthesize_all("Spoken by the int8 graph.", refined)
    assert len(audio) > eng.sample_rate // 2 and np.isfinite(audio).all()
