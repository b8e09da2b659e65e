"""Kokoro engine: real weights, real synthesis (engine loaded once per module)."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import psutil
import pytest
from fakes import TickingClock

from voiced.engines import text
from voiced.engines.base import Conditioning, EngineError, ParamError, TextError
from voiced.engines.kokoro import MAX_TOKENS, KokoroEngine, gradfit, graph, post, torchweights, weights
from voiced.engines.kokoro import engine as kokoro_engine
from voiced.engines.kokoro.backends import BACKENDS
from voiced.engines.kokoro.engine import split_phonemes
from voiced.engines.kokoro.fitting import blend_weights
from voiced.engines.kokoro.post import resample_24k_to_16k
from voiced.fsutil import sha256_file


class Engines(dict):
    """One loaded engine per backend, made on first use in a folder seeded with the session's
    derived model files (``kokoro_models``)."""

    def __init__(self, seed: Any) -> None:
        super().__init__()
        self.seed = seed


@pytest.fixture(scope="module")
def engines(kokoro_models: Any) -> Engines:
    """Shared by the module's tests."""
    return Engines(kokoro_models)


def _loaded(engines: Engines, backend: str, tmp_path_factory: pytest.TempPathFactory) -> KokoroEngine:
    if backend not in engines:
        folder = engines.seed(tmp_path_factory.mktemp(f"kokoro-{backend}"))
        eng = KokoroEngine(folder, max_chars=20_000, backend=backend)
        eng.load("cpu")
        engines[backend] = eng
    return engines[backend]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request: pytest.FixtureRequest, engines: dict[str, KokoroEngine],
           tmp_path_factory: pytest.TempPathFactory) -> KokoroEngine:
    """Every engine test runs on both backends: they must behave the same."""
    return _loaded(engines, request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def voice(engine: KokoroEngine) -> Conditioning:
    return engine.default_conditioning()


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


# ------------------------------------------------------------------------------------ weights


def test_model_join_is_verified_and_cached(tmp_path):
    files = weights.locate()
    path = weights.assemble_model(tmp_path, files)
    assert path.stat().st_size == sum(p.stat().st_size for p in files.parts)
    weights.verify_model(path, files)
    assert weights.assemble_model(tmp_path, files) == path  # cached, not rebuilt
    path.write_bytes(b"truncated")  # a damaged file of the wrong size is rebuilt
    assert weights.assemble_model(tmp_path, files).stat().st_size > 1_000_000
    assert not list(tmp_path.glob(".kokoro-*"))  # no temp files left behind


def test_corrupt_parts_are_rejected(tmp_path):
    files = weights.locate()
    bad = weights.KokoroFiles(files.parts, "0" * 64, files.vocab, files.voices)
    with pytest.raises(EngineError, match="corrupt"):
        weights.assemble_model(tmp_path, bad)
    assert not list(tmp_path.iterdir())


def test_pitch_input_is_added_once_and_rebuilt_when_damaged(engines, tmp_path_factory):
    engine = _loaded(engines, "onnx", tmp_path_factory)
    assert engine.pitch_control
    (edited,) = engine.cache_dir.glob(f"*-{graph.EDIT_VERSION}.onnx")
    digest = edited.with_name(edited.name + ".sha256")
    assert digest.read_text().strip() == sha256_file(edited)
    source = edited.with_name(edited.name.replace(f"-{graph.EDIT_VERSION}", ""))
    assert graph.pitched_model(source) == edited  # cached: same file, not rebuilt
    with open(edited, "r+b") as f:  # a flipped byte no longer matches the digest
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert graph.pitched_model(source) == edited
    assert digest.read_text().strip() == sha256_file(edited)
    assert not list(engine.cache_dir.glob(".*.tmp"))


@pytest.mark.slow  # about 25 s on a 2-core machine; CI runs it
def test_torch_weights_are_extracted_once_and_rebuilt_when_damaged(engines, tmp_path_factory, caplog):
    engine = _loaded(engines, "torch", tmp_path_factory)
    assert engine.pitch_control and engine.device == "cpu"
    model = engine.cache_dir / f"kokoro-v1.0.int8-{engine._files.sha256[:16]}.onnx"  # not its pitch-input copy
    assert model.is_file()
    (saved,) = engine.cache_dir.glob(f"*-{torchweights.EXTRACT_VERSION}.safetensors")
    digest = saved.with_name(saved.name + ".sha256")
    assert digest.read_text().strip() == sha256_file(saved)
    stamp = saved.stat().st_mtime_ns
    assert torchweights.cached_weights(model, engine._files.sha256) == saved
    assert saved.stat().st_mtime_ns == stamp  # cached: not extracted again
    with open(saved, "r+b") as f:  # a flipped byte no longer matches the digest
        f.seek(saved.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING):
        assert torchweights.cached_weights(model, engine._files.sha256) == saved
    assert "do not match their digest" in caplog.text
    assert digest.read_text().strip() == sha256_file(saved)
    state = torchweights.load_state(saved)
    torchweights.check({k: v.numpy() for k, v in state.items()}, torchweights.expected_shapes())


def test_torch_backend_speaks_like_onnxruntime(engines, tmp_path_factory, speaker_encoder):
    """Two sentences, two voices: same length within 2 frames, same speaker, near spectra.

    bench/bench_torch_parity.py measures the same on 20 sentences x 5 voices with WER and time.
    """
    onnx_engine, torch_engine = (_loaded(engines, b, tmp_path_factory) for b in ("onnx", "torch"))
    for voice in ("jf_alpha", "jm_kumo"):
        pack = onnx_engine.voices[voice]
        for sentence in ("The quick brown fox jumps over the lazy dog.", "Could you tell me where the station is?"):
            (ps,) = onnx_engine.phonemize(sentence)
            tokens = onnx_engine.tokens(ps)
            a, b = onnx_engine.infer(tokens, pack), torch_engine.infer(tokens, pack)
            assert abs(len(a) - len(b)) <= 2 * 600, (voice, sentence, len(a), len(b))
            ea, eb = speaker_encoder.embed(a), speaker_encoder.embed(b)
            cosine = float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
            assert cosine >= 0.97, (voice, sentence, cosine)
            assert 0.7 < _rms(b) / _rms(a) < 1.4, (voice, sentence, _rms(a), _rms(b))


@pytest.mark.slow  # about 25 s on a 2-core machine; CI runs it
def test_torch_batch_speaks_each_item_as_it_would_alone(engines, tmp_path_factory):
    """Three utterances of different lengths, voices, speeds and pitches in one padded batch."""
    import torch

    eng = _loaded(engines, "torch", tmp_path_factory)
    net = eng.backend.net
    texts = ("Hello there.", "The quick brown fox jumps over the lazy dog, twice.", "Where is the station?")
    tokens = [torch.tensor([0, *eng.tokens(eng.phonemize(t)[0]), 0]) for t in texts]
    styles = torch.tensor(np.stack([eng.voices[v][len(t) - 2] for v, t in zip(("jf_alpha", "jm_kumo", "jf_nezumi"), tokens)]))
    speed, pitch = torch.tensor([1.0, 1.2, 0.9]), torch.tensor([1.0, 1.1, 0.95])
    with torch.inference_mode():
        alone = [net.batch([t], styles[i:i + 1], speed[i:i + 1], pitch[i:i + 1])[0] for i, t in enumerate(tokens)]
        together = net.batch(tokens, styles, speed, pitch)
        timed = net.batch(tokens, styles, speed, pitch, durations=[a.durations for a in alone])
    for a, b, c in zip(alone, together, timed):
        # the batch's arithmetic may round a token's duration the other way, never more
        assert len(b.durations) == len(a.durations) and (b.durations - a.durations).abs().max() <= 1
        assert torch.equal(c.durations, a.durations) and len(c.audio) == len(a.audio)
        # the same speech: float sums in another order move the source's phase a little (>= 25 dB SNR)
        snr = 10 * torch.log10(a.audio.square().sum() / (a.audio - c.audio).square().sum())
        assert snr > 25, float(snr)


def test_batcher_runs_calls_that_wait_together_and_keeps_replies_apart():
    import threading

    from voiced.engines.kokoro.backends import Batcher

    gate, batches = threading.Event(), []

    def run(items):
        batches.append(list(items))
        if len(batches) == 1:
            assert gate.wait(60), "the test never opened the gate"
        if "bad" in items:
            raise ValueError("bad item")
        return [f"{i}!" for i in items]

    batcher = Batcher(run, max_batch=3)
    results: dict[object, object] = {}

    def call(item):
        try:
            results[item] = batcher(item)
        except ValueError as exc:
            results[item] = exc

    first = threading.Thread(target=call, args=(0,))
    first.start()
    deadline = time.monotonic() + 60
    while not batches:  # the first call runs at once, alone: it waits for no company
        assert time.monotonic() < deadline
        time.sleep(0.01)
    others = [threading.Thread(target=call, args=(i,)) for i in (1, "bad", 2, 3)]
    for t in others:
        t.start()
    while len(batcher._pending) < 4:  # all four queue behind the running batch
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    for t in (first, *others):
        t.join(60)
    assert batches[0] == [0] and len(batches[1]) == 3  # the next batch takes three of the four waiting
    assert max(len(b) for b in batches) == 3  # never more than max_batch
    # the failed batch ran again item by item: only the bad item's caller gets the error
    assert results[0] == "0!" and results[1] == "1!" and results[2] == "2!" and results[3] == "3!"
    assert isinstance(results["bad"], ValueError)
    assert batcher.items >= 5


def test_unknown_backend_is_a_param_error(tmp_path):
    with pytest.raises(ParamError, match="backend must be one of onnx, torch"):
        KokoroEngine(tmp_path, backend="tensorrt")


def test_a_graph_without_f0_is_served_without_pitch(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [x], [y]))
    src = tmp_path / "other.onnx"
    onnx.save(model, str(src))
    assert graph.pitched_model(src) is None
    assert not graph.edit(src, tmp_path / "out.onnx") and not (tmp_path / "out.onnx").exists()


def test_pitch_edit_refused_at_once_without_room(tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "model.onnx"
    src.write_bytes(b"\0" * (1 << 20))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(64 << 20, 63 << 20, 1 << 20))

    def no_child(*args, **kwargs):
        raise AssertionError("the edit was tried without room for its output")

    monkeypatch.setattr(graph.subprocess, "run", no_child)
    with pytest.raises(EngineError, match="not enough free space"):
        graph.pitched_model(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_voices_and_vocab():
    files = weights.locate()
    voices = weights.load_voices(files)
    assert len(voices) == 5 and all(v.shape == (510, 256) for v in voices.values())
    vocab = weights.load_vocab(files)
    assert vocab["ɹ"] and vocab["ˈ"] and " " in vocab


# ------------------------------------------------------------------------------------ text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Dr. Smith paid $3.50.", "Doctor Smith paid three dollars and fifty cents."),
        ("It was 2024-03-15.", "It was March fifteenth, twenty twenty-four."),
        ("Meet at 3:30 pm, Mr. Jones.", "Meet at three thirty P M, Mister Jones."),
        ("I have 1,234 cats and 50% of 21st.", "I have one thousand two hundred thirty-four cats and fifty percent of twenty-first."),
        ("Born in 1984 & 2005.", "Born in nineteen eighty-four and two thousand five."),
        ("It is -5°C, or 23 °F.", "It is minus five degrees Celsius, or twenty-three degrees Fahrenheit."),
        ("Dr. Smith lives on Main St. near the U.S. border.", "Doctor Smith lives on Main Street near the U.S. border."),
        ("Mr Jones drove to St. Paul.", "Mister Jones drove to Saint Paul."),
        ("In the 1990s and the '80s.", "In the nineteen nineties and the eighties."),
        ("Add 1 1/2 cups and 3/4 of it, 24/7.", "Add one and a half cups and three quarters of it, twenty-four seven."),
        ("Version 2.0.1 is 2x faster, 3:1.", "Version two dot zero dot one is two times faster, three to one."),
        ("It weighs 5kg, 1 ft at 60 mph on 5G, 2 GB.",
         "It weighs five kilograms, one foot at sixty miles per hour on 5G, two gigabytes."),
        ("See https://example.com/docs.", "See example.com slash docs."),
        ("Call 555-1234 or +1 (555) 123-4567.",
         "Call five five five, one two three four or plus one, five five five, one two three, four five six seven."),
        ("It takes 3-4 days; it ended 2-1; ref 12-34-56.", "It takes three to four days; it ended two to one; ref one two, three four, five six."),
        ("Back at 1:30:15 with a Ph.D. in C#, #tired.", "Back at one thirty and fifteen seconds with a P H D in C sharp, tired."),
        ("A 50/50 chance, 9/11, 5/16 inch.", "A fifty-fifty chance, nine slash eleven, five sixteenths inch."),
    ],
)
def test_english_normalisation(raw, expected):
    assert text.prepare(raw, "en-us", 1000) == [expected]


def _prepare_or_error(sample: str) -> list[str] | None:
    try:
        return text.prepare(sample, "en-us", 10**6)
    except TextError:
        return None


@pytest.mark.parametrize("unit", ["1", "1,", "1.", "1-", "1/", "1:", "1%", "$1", "5kg ", "555-1234 ", "1 1/2 ", "#1 ",
                                  "\n", " ", "a\n", "-"])
def test_normalisation_of_long_runs_is_linear_and_never_fails(unit):
    """Digit runs of any length are read (digit by digit beyond 15), never a ValueError from int();
    and no pattern rescans a run from every position (the text limit is 20 000 characters)."""
    short, long = (unit * 10_000)[:10_000], (unit * 40_000)[:40_000]
    sentences = _prepare_or_error(long)
    if any(ch.isalnum() for ch in unit):
        assert sentences and not any(ch.isdigit() for s in sentences for ch in s)
    else:
        assert sentences is None  # nothing to pronounce: a TextError, not a hang
    # four times the text may not take sixteen times as long: the best of three in this thread's
    # CPU time, which other processes on a busy machine do not add to, with a wide margin (a
    # quadratic pattern takes 16x)
    timings = []
    for sample in (short, long):
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            _prepare_or_error(sample)
            best = min(best, time.thread_time() - t0)
        timings.append(best)
    assert timings[1] < 10 * timings[0] + 0.05, timings


def test_clean_strips_controls_emoji_and_unifies_quotes():
    assert text.clean('a\x00b\x07 \u200bc 😀 "hi" ‘x’') == "ab c “hi” 'x'"


def test_sentence_split_and_newlines():
    assert text.split_sentences("One. Two!\nThree\n\nFour?") == ["One.", "Two!", "Three.", "Four?"]
    # an abbreviation's full stop before a lower-case word does not end the sentence
    assert text.split_sentences("Ask approx. five. Then go… now. Yes") == ["Ask approx. five.", "Then go… now.", "Yes."]


@pytest.mark.parametrize("bad", ["", "   \n\t", "?!...", "\x00\x01\x02", "😀🎉", "— … ()"])
def test_unspeakable_text_is_a_text_error(engine, voice, bad):
    with pytest.raises(TextError):
        engine.synthesize(bad, voice, {})


def test_too_long_text_is_a_clear_error(engine, voice):
    with pytest.raises(TextError, match="too long"):
        engine.synthesize("word " * 200_000, voice, {})  # 1 MB


def test_long_paragraph_is_chunked_within_the_context(engine):
    pieces = engine.phonemize("and then we walked a little further, " * 300 + "the end " * 400)
    assert len(pieces) > 5
    assert all(0 < len(p) <= MAX_TOKENS for p in pieces)
    assert all(len(p) <= MAX_TOKENS for p in split_phonemes("x" * 2000))


def test_phonemes_use_kokoro_notation(engine):
    (ps,) = engine.phonemize("Hello world, the water.")
    assert ps.startswith("həlˈO wˈɜɹld,") and "ɹ" in ps and "r" not in ps and "ː" not in ps


# ------------------------------------------------------------------------------------ synthesis


def test_synthesis_is_finite_audible_24k(engine, voice):
    chunks = list(engine.synthesize("Hello there, this is a test.", voice, {"speed": 1.0, "lang": "en-us", "seed": 1}))
    assert engine.sample_rate == 24_000
    assert len(chunks) == 1 and chunks[0].dtype == np.float32 and chunks[0].ndim == 1
    audio = chunks[0]
    assert np.isfinite(audio).all() and _rms(audio) > 0.01
    assert 0.8 < len(audio) / 24_000 < 5.0


def test_streams_one_chunk_per_sentence_and_length_grows(engine, voice):
    one = engine.synthesize_all("The cat sat.", voice)
    chunks = list(engine.synthesize("The cat sat. The dog ran far away. Then it rained all day long!", voice, {}))
    assert len(chunks) == 3
    assert sum(map(len, chunks)) > 2 * len(one)


def test_same_input_same_audio(engine, voice):
    a = engine.synthesize_all("Repeatability matters.", voice, {"seed": 7})
    b = engine.synthesize_all("Repeatability matters.", voice, {"seed": 7})
    assert np.array_equal(a, b)


def test_memory_grown_for_a_long_input_is_given_back(engine, voice):
    if engine.backend_name != "onnx":
        pytest.skip("onnxruntime keeps its arena; torch's CPU allocator returns large blocks as they are freed")
    rss = psutil.Process().memory_info
    short = engine.synthesize_all("Still the same voice.", voice)
    gradfit.give_back_heap()  # what earlier tests freed goes first: only this input's buffers count below
    engine.synthesize_all(" ".join(["The quick brown fox jumps over the lazy dog by the river, then runs away"] * 4), voice)
    grown = rss().rss
    engine.release_memory()
    assert grown - rss().rss > 100 * 2**20, "onnxruntime kept the buffers of the 312-token input"
    assert np.array_equal(engine.synthesize_all("Still the same voice.", voice), short)


def test_idle_releases_once_after_the_quiet_period(engine, voice, monkeypatch):
    real_release, released = engine.release_memory, []

    def release() -> None:
        released.append(time.monotonic())
        real_release()

    monkeypatch.setattr(engine, "release_memory", release)
    engine.synthesize_all("Busy.", voice)
    monkeypatch.setattr(kokoro_engine, "IDLE_RELEASE_S", 3600.0)
    engine.idle()
    assert released == []  # a call ran within the quiet period
    monkeypatch.setattr(kokoro_engine, "IDLE_RELEASE_S", 0.0)
    engine.idle()
    engine.idle()
    assert len(released) == 1  # once: no call ran since
    engine.synthesize_all("Busy again.", voice)
    engine._running += 1  # a call in progress (started after the last one ended): no release under it
    try:
        engine.idle()
    finally:
        engine._running -= 1
    assert len(released) == 1
    engine.idle()
    assert len(released) == 2


def test_speed_changes_duration(engine, voice):
    slow = engine.synthesize_all("Speed it up a little.", voice, {"speed": 0.7})
    fast = engine.synthesize_all("Speed it up a little.", voice, {"speed": 1.6})
    assert len(fast) < 0.75 * len(slow)


@pytest.mark.parametrize(
    "params",
    [{"speed": 0}, {"speed": 2.5}, {"speed": float("nan")}, {"speed": "fast"}, {"seed": -1}, {"seed": 1.5}, {"seed": True}, {"seed": 2**32}, {"volume": 2}],
)
def test_bad_params_are_param_errors(engine, voice, params):
    with pytest.raises(ParamError):
        engine.synthesize("Hello.", voice, params)
    assert issubclass(ParamError, ValueError)


def test_unknown_language_is_a_text_error(engine, voice):
    with pytest.raises(TextError, match="language"):
        engine.synthesize("Hello.", voice, {"lang": "xx-nope"})


def test_other_language_and_mixed_control_chars(engine, voice):
    audio = engine.synthesize_all("Bonjour\x00, je m'appelle June.", voice, {"lang": "fr-fr"})
    assert np.isfinite(audio).all() and _rms(audio) > 0.01


def test_conditioning_round_trips_through_npz(engine, voice):
    buf = io.BytesIO()
    np.savez(buf, **voice)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        restored = Conditioning.from_npz(npz, dict(voice.meta))
    assert np.array_equal(engine.synthesize_all("Round trip.", restored), engine.synthesize_all("Round trip.", voice))
    single = Conditioning({"style": voice["style"][20]})  # one (256,) style is accepted too
    assert _rms(engine.synthesize_all("Single style.", single)) > 0.01
    with pytest.raises(EngineError):
        engine.synthesize("Hi.", Conditioning({"speaker": np.zeros(3)}), {})


def test_voicing_warp_keeps_duration_and_scales_pitch(engine, voice):
    sr = post.SAMPLE_RATE
    tone = np.sin(2 * np.pi * 200 * np.arange(sr) / sr).astype(np.float32)
    for warp in (0.9, 1.1):
        shifted = post.apply_warp(tone, warp)
        assert len(shifted) == pytest.approx(sr / warp, rel=0.01)
        peak = np.argmax(np.abs(np.fft.rfft(shifted * np.hanning(len(shifted))))) * sr / len(shifted)
        assert peak == pytest.approx(200 * warp, abs=3)
    sentence = "The rain in Spain stays mainly in the plain."
    flat = engine.synthesize_all(sentence, voice)
    for warp in (0.9, 1.1):  # the model speaks at speed / warp, so the duration is kept
        out = engine.synthesize_all(sentence, Conditioning({"style": voice["style"], "warp": np.array([warp], np.float32)}))
        assert abs(len(out) - len(flat)) < 0.08 * len(flat) and np.isfinite(out).all()
        assert not np.allclose(out[: len(flat)], flat[: len(out)])


def _median_f0(audio: np.ndarray, sr: int = 24_000) -> float:
    """Median F0 of the clearly voiced 40 ms frames (normalised autocorrelation peak > 0.6)."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    lags = np.arange(sr // 500, sr // 60)
    f0s = []
    for start in range(0, len(audio) - n, hop):
        frame = audio[start:start + n].astype(np.float64)
        frame -= frame.mean()
        energy = float(frame @ frame)
        if energy < 1e-4:
            continue
        ac = np.array([frame[:-lag] @ frame[lag:] for lag in lags]) / energy
        k = int(np.argmax(ac))
        if ac[k] > 0.6:
            f0s.append(sr / lags[k])
    assert len(f0s) > 20
    return float(np.median(f0s))


def test_voicing_pitch_moves_f0_and_keeps_timing(engine, voice):
    sentence = "We were away a year ago, in May."
    flat = engine.synthesize_all(sentence, voice)
    low, high = (engine.synthesize_all(sentence, Conditioning({"style": voice["style"], "pitch": np.array([p], np.float32)}))
                 for p in (0.8, 1.25))
    # the durations come from the predictor, before the F0 curve: timing is untouched
    assert len(low) == len(flat) == len(high)
    assert _median_f0(high) / _median_f0(low) == pytest.approx(1.25 / 0.8, rel=0.1)
    assert _median_f0(flat) == pytest.approx(_median_f0(low) / 0.8, rel=0.1)


def test_voicing_eq_shapes_the_spectrum(engine, voice):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(48_000).astype(np.float32) * 0.1
    gains = np.zeros(post.N_BANDS)
    gains[: post.N_BANDS // 2] = 6.0
    gains[post.N_BANDS // 2:] = -6.0
    shaped = post.apply_eq(noise, gains)
    got = post.match_gains(post.band_powers(shaped, 24_000), post.band_powers(noise, 24_000))
    inner = slice(2, post.N_BANDS - 2)  # band edges of a smooth FIR blur the extreme bands
    assert np.allclose(got[inner] - got[inner].mean(), gains[inner] - gains[inner].mean(), atol=2.5)
    assert np.array_equal(post.apply_eq(noise, np.zeros(post.N_BANDS)), noise)
    cond = Conditioning({"style": voice["style"], "eq": gains.astype(np.float32)})
    assert _rms(engine.synthesize_all("Equalised speech.", cond)) > 0.01


@pytest.mark.parametrize("extra", [
    {"warp": np.array([3.0], np.float32)},
    {"warp": np.array([1.0, 1.0], np.float32)},
    {"pitch": np.array([3.0], np.float32)},
    {"pitch": np.array([np.nan], np.float32)},
    {"pitch": np.array([1.0, 1.0], np.float32)},
    {"eq": np.zeros(5, np.float32)},
    {"eq": np.full(post.N_BANDS, np.nan, np.float32)},
    {"eq": np.full(post.N_BANDS, 80.0, np.float32)},
    {"eq": np.full(post.N_BANDS, -80.0, np.float32)},
])
def test_bad_voicing_is_an_engine_error(engine, voice, extra):
    with pytest.raises(EngineError):
        engine.synthesize("Hi.", Conditioning({"style": voice["style"], **extra}), {})


def test_unloaded_engine_says_so(tmp_path):
    with pytest.raises(EngineError, match="not loaded"):
        KokoroEngine(tmp_path).synthesize("Hi.", {}, {})


# ------------------------------------------------------------------------------------ fitting


def test_blend_weights_recover_a_mixture():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 256))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    w = blend_weights(0.7 * base[1] + 0.3 * base[3], base)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[1] == pytest.approx(0.7, abs=0.02) and w[3] == pytest.approx(0.3, abs=0.02)


def test_resample_keeps_duration():
    assert len(resample_24k_to_16k(np.zeros(24_000, np.float32))) == 16_000


@pytest.fixture(scope="module")
def allison(engine: KokoroEngine, testdata_dir, speaker_encoder):
    """Allison's reference and its embedding; the engine gets the session's encoder."""
    import soundfile as sf

    engine._encoder = speaker_encoder  # the module's engine was loaded without one
    wav, sr = sf.read(testdata_dir / "voices" / "allison_a.wav", dtype="float32")
    assert sr == 16_000
    return wav, speaker_encoder.embed(wav)


def test_stock_stage_is_the_nearest_base_voice_without_synthesis(engine, allison, monkeypatch):
    wav, emb = allison
    fitter = engine.fitter()
    sims = fitter.stock_similarities(emb)

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the stock stage synthesized")

    monkeypatch.setattr(engine, "render", no_synthesis)
    monkeypatch.setattr(engine, "infer", no_synthesis)
    stock = engine.prepare_voice(wav, emb, stage="stock")
    best = max(sims, key=sims.get)
    assert stock.meta["stage"] == "stock" and stock.meta["stock_best"] == best
    assert np.array_equal(stock["style"], engine.style_pack(engine.base_conditioning(best)))
    assert engine.voicing(stock)[:2] == (1.0, 1.0) and "eq" not in stock
    assert engine.stages == ("stock", "quick", "refined")


def test_quick_voice_is_closer_than_stock(engine, allison):
    wav, emb = allison
    fitter = engine.fitter()
    quick = engine.prepare_voice(wav, emb, stage="quick")
    stock_name = quick.meta["stock_best"]
    assert quick["style"].shape == (510, 256)
    assert quick["eq"].shape == (post.N_BANDS,) and post.MIN_GAIN_DB <= quick["eq"].min() <= quick["eq"].max() <= post.MAX_GAIN_DB
    assert len(quick.meta["reference_bands_db"]) == post.N_BANDS
    probe = "I went to the market yesterday and bought some bread."
    sim_quick = float(fitter.embed_audio(engine.synthesize_all(probe, quick)) @ emb / np.linalg.norm(emb))
    sim_stock = float(fitter.embed_audio(engine.synthesize_all(probe, engine.base_conditioning(stock_name))) @ emb / np.linalg.norm(emb))
    assert sim_quick >= sim_stock - 0.01  # on unseen text, up to the encoder's noise
    # the daemon's quick stage is the unchecked prediction: no synthesis, so no measured similarity
    assert quick.meta["checked"] is False and "similarity" not in quick.meta
    assert quick.meta["predicted_similarity"] > quick.meta["stock_similarity"]
    again = engine.prepare_voice(wav, emb, stage="quick")
    assert all(np.array_equal(quick[k], again[k]) for k in quick)
    # checked: the blend spoken once, never worse than the best single base voice on that sentence
    checked = fitter.quick(emb, wav)
    assert "checked" not in checked.meta and checked.meta["similarity"] >= checked.meta["stock_similarity"]
    assert checked.meta["reference_bands_db"] == quick.meta["reference_bands_db"]


def test_eq_tuning_raises_similarity(engine, allison):
    from voiced.engines.kokoro.eqtune import EqTuner

    wav, emb = allison
    fitter = engine.fitter()
    tuner = EqTuner.create(fitter.encoder)
    assert tuner is not None and EqTuner.create(object()) is None
    audio = [fitter.base_audio[0][0]]
    start = post.match_gains(post.band_powers(wav, 16_000), post.band_powers(audio[0], 24_000))
    gains, before, after, steps = tuner.tune(audio, start, emb, steps=6)
    assert steps == 6 and after > before and post.MIN_GAIN_DB <= gains.min() <= gains.max() <= post.MAX_GAIN_DB
    # what the tuner optimised is what the encoder then measures on the equalised audio: the
    # tuner filters exactly as post.apply_eq does (before: the cosine it started from)
    unit = emb / np.linalg.norm(emb)
    assert float(fitter.embed_audio(post.apply_eq(audio[0], start)) @ unit) == pytest.approx(before, abs=0.002)
    # after: the tuner keeps the silence mask the start gains gave (see EqTuner._sentence), the
    # encoder recomputes it on the equalised audio; a few quiet frames may change sides
    assert float(fitter.embed_audio(post.apply_eq(audio[0], gains)) @ unit) == pytest.approx(after, abs=0.015)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five fits: minutes on a busy 2-core machine
def test_refined_is_deterministic_and_not_worse(engine, allison, caplog):
    """The budget buys fixed work: a slower machine takes longer for the same voice."""
    from voiced.engines.kokoro import fitting

    wav, emb = allison
    quick = engine.prepare_voice(wav, emb, stage="quick")
    budget = 26.0  # enough for a few search evaluations and EQ tuning steps
    evals, steps = fitting.work_for_budget(budget)
    assert evals > 4 and steps > 0
    still = TickingClock()  # time stands still: however long the work takes, it is not cut
    a = engine.fitter().refine(emb, previous=quick, budget_s=budget, clock=still)
    assert a.meta["evaluations"] == evals and a.meta["eq_tuning"]["steps"] == steps and "cut" not in a.meta
    # the unchecked quick voice is checked first: the fit starts from the measured blend
    assert a.meta["quick_similarity"] == pytest.approx(engine.fitter().quick(emb, wav).meta["similarity"], abs=0.002)
    assert a.meta["similarity"] >= a.meta["quick_similarity"]
    assert post.WARP_RANGE[0] <= float(a["warp"][0]) <= post.WARP_RANGE[1]
    voicing = engine.voicing(a)
    assert post.PITCH_RANGE[0] <= voicing.pitch <= post.PITCH_RANGE[1]
    assert still.reads > 10

    def machine_taking(budgets: float) -> TickingClock:  # the same work takes that many budgets of time
        return TickingClock(budgets * budget / still.reads)

    # within the time cap (3 budgets): the same work, the same voice
    b = engine.fitter().refine(emb, previous=quick, budget_s=budget, clock=machine_taking(1.5))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert b.meta == a.meta
    # past the cap: cut short, and the log says the voice is not reproducible
    with caplog.at_level(logging.WARNING, logger="voiced.engines.kokoro.fitting"):
        c = engine.fitter().refine(emb, previous=quick, budget_s=budget, clock=machine_taking(30.0))
    assert c.meta.get("cut") is True and c.meta["evaluations"] < evals
    assert any("cut short" in r.getMessage() for r in caplog.records)
    stopped = engine.prepare_voice(wav, emb, stage="refined", previous=quick, should_stop=lambda: True)
    assert stopped.meta["evaluations"] == 0 and np.array_equal(stopped["style"], quick["style"])
    assert "cut" not in stopped.meta


@pytest.fixture(scope="module")
def bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_kokoro.py"
    spec = importlib.util.spec_from_file_location("bench_kokoro", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_word_error_rate_normalises_case_and_punctuation(bench_module):
    assert bench_module.wer("Hello, World! It's fine.", "hello world it's fine") == (0, 4)
    assert bench_module.wer("the cat sat", "the bat sat down") == (2, 3)  # one substitution, one insertion
    assert bench_module.wer("a b c", "") == (3, 3)


def test_bench_log_mel_distance_pairs_frames_that_moved(bench_module):
    import judges  # on the path once bench_kokoro is loaded

    rng = np.random.default_rng(3)
    t = np.arange(24_000) / 24_000
    a = (0.3 * np.sin(2 * np.pi * 220 * t) * (t < 0.5) + 0.3 * np.sin(2 * np.pi * 660 * t) * (t >= 0.5)).astype(np.float32)
    shifted = np.concatenate([a[:6600], a[6000:6600], a[6600:]])  # 25 ms repeated: the rest comes later
    assert judges.log_mel_distance(a, a) == 0.0
    paired, unpaired = judges.log_mel_distance(a, shifted), judges.log_mel_distance(a, shifted, align=False)
    noise = rng.standard_normal(len(a)).astype(np.float32) * 0.3
    assert paired < 0.6 * unpaired < judges.log_mel_distance(a, noise) / 10


def test_bench_sentence_sets_are_held_out(bench_module):
    """The bench's figures are on text the fit never speaks, and its sets do not share a sentence."""
    from voiced.engines.kokoro.fitting import CALIBRATION_TEXTS, TUNING_TEXTS

    def norm(texts):
        return {" ".join(bench_module._words(t)) for t in texts}

    fit = norm((*CALIBRATION_TEXTS, *TUNING_TEXTS))
    held_out, base = norm(bench_module.WER_TEXTS), norm(bench_module.BASE_VOICE_TEXTS)
    assert set(bench_module.SIM_TEXTS) <= set(bench_module.WER_TEXTS)
    assert len(held_out) == len(bench_module.WER_TEXTS) and len(base) == len(bench_module.BASE_VOICE_TEXTS)
    assert not fit & held_out and not fit & base and not held_out & base


def test_refine_reports_the_share_of_its_work_done(engine, allison):
    wav, emb = allison
    quick = engine.prepare_voice(wav, emb, stage="quick")
    shares: list[float] = []
    # time stands still for the fit (see TickingClock): its work, not this machine's speed, decides
    engine.fitter().refine(emb, previous=quick, budget_s=4.0, reference=wav, progress=shares.append,
                           clock=TickingClock())
    assert shares[-1] == 1.0 and len(shares) >= 3, shares  # after each of its evaluations, then done
    assert shares == sorted(shares) and 0.0 < shares[0] < 1.0 and max(shares[:-1]) < 1.0


def test_paused_time_does_not_count_against_the_fit_budget():
    from voiced.engines.kokoro.fitting import _Budget, _Clock

    now = [0.0]  # the time source the fit reads, moved by hand
    calls: list[float] = []

    def pause_once() -> bool:  # the daemon holds a fit here for 0.6 s while requests are served
        if not calls:
            now[0] += 0.6
        calls.append(now[0])
        return False

    def work() -> int:  # one evaluation, 0.1 s
        now[0] += 0.1
        return 7

    clock = _Clock(pause_once, lambda: now[0])
    budget = _Budget(clock, clock.now(), 0.4, None)
    assert not budget.exhausted() and clock.paused == pytest.approx(0.6) and not clock.stopped
    assert budget.run(work) == 7 and budget.evals == 1 and budget.per_eval == pytest.approx(0.1)
    assert budget.run(work) == 7 and budget.evals == 2  # 0.2 s of work, 0.6 s paused
    now[0] += 0.15  # 0.35 s run: one more 0.1 s evaluation would pass the 0.4 s budget
    assert budget.exhausted() and budget.cut and not clock.stopped
    told = _Clock(lambda: True)
    assert _Budget(told, told.now(), 100.0, None).exhausted() and told.stopped


def _refine_under_demand(engine, speaker_encoder, testdata_dir, tmp_path, monkeypatch,
                         hold_s: float) -> tuple[list[str], dict | None]:
    """Prepare allison in a real library; once its refinement runs, requests 'wait' for ``hold_s``.

    Returns the fitter's log lines (DEBUG and up) once the voice is refined, and the progress the
    voice showed at the end of the hold.
    """
    import shutil
    import threading

    from voiced.store import LocalStore
    from voiced.config import VoicesConfig
    from voiced.library import Library

    voices = tmp_path / "voices"
    voices.mkdir()
    shutil.copy(testdata_dir / "voices" / "allison_a.wav", voices / "allison.wav")
    refining, demand = threading.Event(), threading.Event()
    prepare = engine.prepare_voice

    def watched_prepare(*args, **kwargs):
        if kwargs.get("stage") == "refined":
            refining.set()
        return prepare(*args, **kwargs)

    monkeypatch.setattr(engine, "prepare_voice", watched_prepare)
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    fit_log = logging.getLogger("voiced.engines.kokoro.fitting")
    fit_log.addHandler(handler)
    level = fit_log.level
    fit_log.setLevel(logging.DEBUG)
    holding = threading.Event()  # the fit asked whether requests wait while they did: it holds still

    def demanded() -> bool:
        if demand.is_set():
            holding.set()
            return True
        return False

    cache = LocalStore(tmp_path / "cache")
    library = Library(VoicesConfig(dir=voices), cache, speaker_encoder, engine=engine, stage_budget_s=4.0)
    library.set_external_demand(demanded)
    library.start()
    try:
        library.sync_path("allison.wav")
        assert refining.wait(120), "the refinement never started"
        demand.set()  # requests wait from now on: the fit must hold still
        # held from the fit's first look on, so the pause is hold_s on a machine of any speed
        assert holding.wait(120), "the refinement never looked for waiting requests"
        time.sleep(hold_s)
        held = library.get("allison")
        assert held is not None and held.stage == "quick"
        shown = held.to_dict().get("progress")  # what 'voiced voices' shows meanwhile
        demand.clear()
        assert library.wait_for(lambda: library.get("allison").stage == "refined", 120)
        assert "progress" not in library.get("allison").to_dict()
    finally:
        library.stop()
        cache.close()
        fit_log.removeHandler(handler)
        fit_log.setLevel(level)
    return [m for m in records if m.startswith("kokoro refine")], shown


def test_background_refinement_pauses_for_requests_and_resumes(engine, allison, speaker_encoder, testdata_dir,
                                                                tmp_path, monkeypatch):
    """A refinement that meets waiting requests pauses and then finishes: one fit, not a restart."""
    import re

    fits, shown = _refine_under_demand(engine, speaker_encoder, testdata_dir, tmp_path, monkeypatch, hold_s=4.0)
    assert len(fits) == 1 and "stopped" not in fits[0], fits
    assert shown is not None and shown["stage"] == "refined" and 0.0 <= shown["done"] < 1.0, shown
    paused = float(re.search(r"\(([\d.]+)s paused\)", fits[0]).group(1))
    assert paused >= 4.0, fits  # all the time requests waited: it held from its first look at them


def test_refinement_paused_too_long_is_set_aside_and_run_again(engine, allison, speaker_encoder, testdata_dir,
                                                               tmp_path, monkeypatch):
    """Past the pause limit the stage is abandoned, not stored half-done, and runs again afterwards."""
    from voiced.library import preparer

    monkeypatch.setattr(preparer, "_MAX_PAUSE_S", 1.0)
    fits, shown = _refine_under_demand(engine, speaker_encoder, testdata_dir, tmp_path, monkeypatch, hold_s=5.0)
    assert len(fits) == 2 and "stopped" in fits[0] and "stopped" not in fits[1], fits
    assert shown is None  # set aside: no stage runs while the requests still wait


def test_a_drop_reaches_each_stage_for_every_voice_before_the_next(engine, speaker_encoder, testdata_dir,
                                                                    tmp_path, monkeypatch):
    """Every voice usable at 'stock' first, then all at 'quick', then the costly refinements."""
    import shutil

    from voiced.store import LocalStore
    from voiced.config import VoicesConfig
    from voiced.library import Library

    voices = tmp_path / "voices"
    voices.mkdir()
    for stem in ("allison_a", "carlo_a", "june_a"):
        shutil.copy(testdata_dir / "voices" / f"{stem}.wav", voices / f"{stem.split('_')[0]}.wav")
    calls: list[tuple[str, str]] = []
    prepare = engine.prepare_voice

    def recorded(reference, embedding, *, stage, **kwargs):
        calls.append((stage, f"{float(np.asarray(embedding)[0]):.6f}"))
        return prepare(reference, embedding, stage=stage, **kwargs)

    monkeypatch.setattr(engine, "prepare_voice", recorded)
    cache = LocalStore(tmp_path / "cache")
    library = Library(VoicesConfig(dir=voices), cache, speaker_encoder, engine=engine, stage_budget_s=0.5)
    library.start()
    try:
        for name in ("allison.wav", "carlo.wav", "june.wav"):
            library.sync_path(name)
        def refined(name: str) -> bool:
            voice = library.get(name)
            return voice is not None and voice.stage == "refined"

        assert library.wait_for(lambda: all(map(refined, ("allison", "carlo", "june"))), 600), calls
    finally:
        library.stop()
        cache.close()
    stages = [stage for stage, _ in calls]
    assert stages == ["stock"] * 3 + ["quick"] * 3 + ["refined"] * 3, calls
    assert len({who for _, who in calls}) == 3  # three voices, each through each stage once


def test_bench_tradeoff_line_runs_from_the_voice_to_the_stock_voice(bench_module, engine, voice):
    stock = engine.base_conditioning(sorted(v for v in engine.voices if v != engine.default_voice)[0])
    cloned = Conditioning({"style": engine.style_pack(voice), "warp": np.array([1.1], np.float32),
                           "pitch": np.array([0.9], np.float32), "eq": np.linspace(-6, 6, post.N_BANDS).astype(np.float32)}, {})
    start, middle, end = (bench_module.toward(cloned, stock, a) for a in (0.0, 0.5, 1.0))
    assert np.array_equal(start["style"], cloned["style"]) and engine.voicing(start)[:2] == pytest.approx((1.1, 0.9))
    assert np.array_equal(start["eq"], cloned["eq"])
    assert np.allclose(middle["style"], (engine.style_pack(voice) + engine.style_pack(stock)) / 2)
    assert engine.voicing(middle)[:2] == pytest.approx((1.1 ** 0.5, 0.9 ** 0.5))
    assert np.array_equal(end["style"], engine.style_pack(stock)) and engine.voicing(end)[:2] == (1.0, 1.0)
    assert not np.any(end["eq"])
    text = "The line ends at the stock voice."
    a, b = engine.synthesize_all(text, end), engine.synthesize_all(text, stock)
    assert len(a) == len(b) and np.abs(a - b).max() < 0.01 * np.abs(b).max()
