"""The plugin host (loading, order, errors, settings, tracing) and the first-party plugins."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from voiced.config import PluginsConfig
from voiced.errors import ConfigError, VoicedError
from voiced.hooks import PluginError, PluginHost, hookimpl, new_request

RATE = 24000
VOICES = Path(os.environ.get("VOICED_TESTDATA") or Path(__file__).parents[1].parent / "shared" / "testdata") / "voices"


def host(enabled: tuple[str, ...] = (), *, paths: tuple[Path, ...] = (), settings: dict | None = None,
         extra: Any = (), entry_points: bool = False) -> PluginHost:
    return PluginHost(PluginsConfig(enabled=enabled, paths=paths), settings=settings or {}, extra=extra,
                      entry_points=entry_points)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """About 6 s of real speech at 24 kHz (a test-data recording), or a speech-like stand-in."""
    path = VOICES / "allison_a.wav"
    if path.is_file():
        import soxr

        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        audio = soxr.resample(audio.mean(axis=1), rate, RATE)[: 6 * RATE]
    else:  # syllable-rate modulated harmonics
        t = np.arange(6 * RATE) / RATE
        audio = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700, 1400), 1))
        audio = audio * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    audio = np.asarray(audio, dtype=np.float32)
    return audio / np.max(np.abs(audio)) * 0.5


def request(**over: Any) -> dict[str, Any]:
    req = new_request(text="hello", voice={"name": "alice", "sha256": "ab" * 32}, params={"speed": 1.0})
    req.update(over)
    return req


# ---------------------------------------------------------------------- host: sources and order


class Marker:
    """An in-process plugin: appends its mark to the text; scales or offsets the audio."""

    def __init__(self, mark: str, op: str = "") -> None:
        self.mark, self.op = mark, op

    @hookimpl
    def voiced_preprocess_text(self, text: str) -> str:
        return text + self.mark

    @hookimpl
    def voiced_postprocess_audio(self, audio: np.ndarray) -> np.ndarray | None:
        if self.op == "double":
            return audio * 2
        if self.op == "plus1":
            return audio + 1
        return None


def test_in_process_plugins_chain_in_the_given_order() -> None:
    h = host(extra=[("b", Marker("B", "double")), ("a", Marker("A", "plus1"))])
    assert h.names() == ["builtin", "b", "a"]
    assert h.preprocess_text("x", "alice", {}) == "xBA"
    out = h.postprocess_audio(np.array([0.25, 0.5], dtype=np.float32), RATE, request())
    assert out.dtype == np.float32 and np.allclose(out, [1.5, 2.0])  # (x * 2) + 1, not (x + 1) * 2
    timings = h.timings()
    assert timings["a"]["calls"] == 2 and timings["b"]["calls"] == 2
    assert set(timings["a"]) == {"calls", "total_ms", "max_ms", "errors"}


def test_path_plugins_load_by_name_order_after_first_party(tmp_path: Path) -> None:
    # a_upper imports from voiced.hookspecs and voiced.plugins, where these names were first
    # documented: plugins written that way keep working
    (tmp_path / "b_wolf.py").write_text(textwrap.dedent("""
        from voiced.hookspecs import hookimpl

        @hookimpl
        def voiced_preprocess_text(text):
            return text.replace("dog", "wolf")
    """))
    (tmp_path / "a_upper.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from voiced.hookspecs import hookimpl
        from voiced.plugins import PluginSettings

        @dataclass(frozen=True, kw_only=True)
        class Settings(PluginSettings):
            suffix: str = "!"

        class Suffix:
            def __init__(self, settings):
                self.suffix = settings.suffix

            @hookimpl
            def voiced_preprocess_text(self, text, voice):
                return f"{text}{self.suffix}"

        def plugin(settings):
            return Suffix(settings)
    """))
    (tmp_path / "_private.py").write_text("raise RuntimeError('not a plugin')\n")
    h = host(("lexicon",), paths=(tmp_path,), settings={"lexicon": {"entries": {"cat": "dog"}}, "a_upper": {"suffix": "?"}})
    assert h.names() == ["builtin", "lexicon", "a_upper", "b_wolf"]
    # lexicon (first-party) first: cat -> dog; then a_upper adds "?"; then b_wolf: dog -> wolf
    assert h.preprocess_text("my cat", "alice", {}) == "my wolf?"
    assert h.settings("a_upper").suffix == "?"


def install(site: Path, monkeypatch: pytest.MonkeyPatch, name: str, group: str, body: str) -> None:
    """An installed distribution voiced-NAME whose module voiced_NAME is declared in ``group``."""
    site.mkdir(exist_ok=True)
    (site / f"voiced_{name}.py").write_text(textwrap.dedent(body))
    dist = site / f"voiced_{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: voiced-{name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = voiced_{name}\n")
    monkeypatch.syspath_prepend(str(site))


def test_entry_point_plugins_are_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path / "site", monkeypatch, "shout", "voiced", """
        from voiced.hookspecs import hookimpl

        @hookimpl
        def voiced_preprocess_text(text):
            return text.upper()
    """)
    h = host(("lexicon",), settings={"lexicon": {"entries": {"hi": "hello"}}}, entry_points=True)
    assert "shout" in h.names() and h.names().index("shout") > h.names().index("lexicon")
    assert h.preprocess_text("hi there", "alice", {}) == "HELLO THERE"
    assert any(p["name"] == "shout" and "voiced-shout" in p["source"] for p in h.status()["loaded"])


DOC_EXAMPLE = '''
from dataclasses import dataclass
import numpy as np
from voiced.hooks import PluginSettings, hookimpl

@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):          # the keys of [plugins.drive], typed, with defaults
    amount: float = 3.0

class Drive:
    def __init__(self, settings: Settings):
        self.k = settings.amount

    @hookimpl
    def voiced_postprocess_audio(self, audio):
        return np.tanh(self.k * audio) / np.tanh(self.k)

def plugin(settings: Settings) -> Drive:  # optional: without it, module-level @hookimpl functions are used
    return Drive(settings)
'''


def test_the_documented_example_plugin_works(tmp_path: Path) -> None:
    (tmp_path / "drive.py").write_text(DOC_EXAMPLE)
    h = host(paths=(tmp_path,), settings={"drive": {"amount": 2.0}})
    out = h.postprocess_audio(np.array([0.0, 0.5, 1.0], np.float32), RATE, request())
    assert np.allclose(out, np.tanh(2.0 * np.array([0.0, 0.5, 1.0])) / np.tanh(2.0), atol=1e-6)
    with pytest.raises(ConfigError, match=r"\[plugins.drive\] amount: expected number"):
        host(paths=(tmp_path,), settings={"drive": {"amount": "lots"}})


def test_first_party_plugins_are_entry_points_like_any_package_s() -> None:
    """Every module in plugins/ is declared in the group voiced.optional, and the install has them."""
    import pkgutil

    import plugins as package

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from voiced.hooks import optional_names

    modules = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["voiced.optional"] == {name: f"plugins.{name}" for name in modules}
    assert set(modules) <= set(optional_names())
    h = host(("trim",))
    assert h.names() == ["builtin", "trim"] and h.status()["loaded"][1]["source"] == "first-party"


def test_a_package_s_optional_plugin_stays_off_until_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path / "site", monkeypatch, "hush", "voiced.optional", """
        from voiced.hooks import hookimpl

        @hookimpl
        def voiced_preprocess_text(text):
            return text.lower()
    """)
    assert "hush" not in host(entry_points=True).names()
    h = host(("hush", "lexicon"), settings={"lexicon": {"entries": {"hi": "HELLO"}}}, entry_points=True)
    assert h.names()[:3] == ["builtin", "hush", "lexicon"]  # in the order enabled names them
    assert h.preprocess_text("Hi There", "alice", {}) == "HELLO there"
    assert any(p["name"] == "hush" and p["source"] == "package voiced-hush" for p in h.status()["loaded"])


def test_unknown_first_party_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown plugin 'loudnes'.*did you mean 'loudness'"):
        host(("loudnes",))


def test_misspelled_hookimpl_fails_at_start_naming_the_plugin(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text(textwrap.dedent("""
        from voiced.hookspecs import hookimpl

        @hookimpl
        def voiced_postprocess_audo(audio):
            return audio
    """))
    with pytest.raises(ConfigError, match=r"plugin 'typo'.*voiced_postprocess_audo.*did you mean 'voiced_postprocess_audio'"):
        host(paths=(tmp_path,))


def test_hookimpl_with_an_unknown_argument_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "badarg.py").write_text(textwrap.dedent("""
        from voiced.hookspecs import hookimpl

        @hookimpl
        def voiced_preprocess_text(text, language):
            return text
    """))
    with pytest.raises(ConfigError, match=r"plugin 'badarg'.*language"):
        host(paths=(tmp_path,))


def test_plugin_that_fails_to_import_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match=r"plugin 'broken'.*ModuleNotFoundError"):
        host(paths=(tmp_path,))


def test_duplicate_names_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "trim.py").write_text("")
    with pytest.raises(ConfigError, match=r"two plugins are named 'trim'"):
        host(("trim",), paths=(tmp_path,))


# ---------------------------------------------------------------------- host: errors and tracing


class Boom:
    def __init__(self, hook_error: type[Exception] = RuntimeError) -> None:
        self.error = hook_error

    @hookimpl
    def voiced_postprocess_audio(self, audio: np.ndarray) -> np.ndarray:
        raise self.error("kaput")

    @hookimpl
    def voiced_preprocess_text(self, text: str) -> str:
        raise self.error("kaput")

    @hookimpl
    def voiced_voice_ready(self, voice: dict) -> None:
        raise self.error("kaput")

    @hookimpl
    def voiced_synthesis_done(self, request: dict) -> None:
        raise self.error("kaput")


def test_failing_plugin_raises_plugin_error_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    h = host(extra=[("boom", Boom()), ("after", Marker("!", "double"))])
    with pytest.raises(PluginError) as info:
        h.postprocess_audio(np.zeros(10, np.float32), RATE, request())
    assert info.value.plugin == "boom" and "boom" in str(info.value) and "kaput" in str(info.value)
    assert isinstance(info.value, VoicedError)
    with pytest.raises(PluginError, match="plugin 'boom'.*voiced_preprocess_text"):
        h.preprocess_text("x", "alice", {})
    assert "plugin boom failed" in caplog.text
    assert h.timings()["boom"]["errors"] == 2
    # lifecycle and after-reply hooks never propagate
    h.voice_event("ready", {"name": "alice"})
    h.synthesis_done(request(), np.zeros(10, np.float32), RATE, {})
    h.voice_event("preparing", {"name": "alice"})  # not a hook: ignored
    assert h.timings()["boom"]["errors"] == 4


def test_skip_policy_skips_the_plugin_for_that_call(caplog: pytest.LogCaptureFixture) -> None:
    h = host(extra=[("boom", Boom()), ("after", Marker("!", "double"))], settings={"boom": {"on_error": "skip"}})
    caplog.set_level(logging.WARNING)
    out = h.postprocess_audio(np.ones(4, np.float32), RATE, request())
    assert np.allclose(out, 2.0)
    assert h.preprocess_text("x", "alice", {}) == "x!"
    assert "boom failed in voiced_postprocess_audio and is skipped" in caplog.text


def test_bad_return_values_are_plugin_errors() -> None:
    class Bad:
        @hookimpl
        def voiced_preprocess_text(self, text: str) -> Any:
            return 42

        @hookimpl
        def voiced_postprocess_audio(self, audio: np.ndarray) -> Any:
            return np.full((2, 3), np.nan)

    h = host(extra=[("bad", Bad())])
    with pytest.raises(PluginError, match=r"'bad'.*returned int"):
        h.preprocess_text("x", "alice", {})
    with pytest.raises(PluginError, match=r"'bad'.*mono"):
        h.postprocess_audio(np.zeros(4, np.float32), RATE, request())
    assert h.timings()["bad"]["errors"] == 2


def test_trace_switch_logs_every_call(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("VOICED_TRACE_PLUGINS", "1")
    h = host(extra=[("a", Marker("A"))])
    caplog.set_level(logging.INFO, logger="voiced.hooks.host")
    h.preprocess_text("x", "alice", {})
    assert "plugin a: voiced_preprocess_text took" in caplog.text
    monkeypatch.delenv("VOICED_TRACE_PLUGINS")
    caplog.clear()
    host(extra=[("a", Marker("A"))]).preprocess_text("x", "alice", {})
    assert "took" not in caplog.text


def test_startup_and_shutdown() -> None:
    calls: list[Any] = []

    class Life:
        @hookimpl
        def voiced_startup(self, daemon_info: dict) -> None:
            calls.append(daemon_info["version"])

        @hookimpl
        def voiced_shutdown(self) -> None:
            calls.append("down")
            raise RuntimeError("ignored at shutdown")

    h = host(extra=[("life", Life())])
    h.startup({"version": "1"})
    h.shutdown()
    assert calls == ["1", "down"]


# ---------------------------------------------------------------------- host: engines


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"bogus": 1}, "unexpected keyword argument 'bogus'"),
        ({"threads": "x"}, "threads must be a whole number from 0 to 256, got 'x'"),
        ({"threads": -3}, "threads must be a whole number from 0 to 256, got -3"),
        ({"threads": 2.5}, "threads must be a whole number from 0 to 256, got 2.5"),
        ({"max_chars": 0}, "max_chars must be a whole number >= 1, got 0"),
        ({"max_chars": True}, "max_chars must be a whole number >= 1, got True"),
        ({"default_voice": "nobody"}, "default_voice: unknown base voice 'nobody'"),
    ],
)
def test_bad_kokoro_options_name_the_option(tmp_path: Path, options: dict, fragment: str) -> None:
    """Caught when the daemon builds the engine, before any model is loaded; the real engine class."""
    from types import SimpleNamespace

    with pytest.raises(ConfigError, match=r"\[engine\] options: ") as info:
        host().create_engine(SimpleNamespace(name="kokoro", options=options, device="cpu"), tmp_path, encoder=None)
    assert fragment in str(info.value)


def test_builtin_engine_registers_and_others_can_add_engines(tmp_path: Path) -> None:
    from types import SimpleNamespace

    class Fake:
        @hookimpl
        def voiced_register_engines(self, register: Any) -> None:
            register("fake", lambda ctx: ("engine", ctx.models_dir, dict(ctx.options)))

    h = host(extra=[("fake", Fake())])
    assert set(h.register_engines()) == {"kokoro", "fake"}
    engine = h.create_engine(SimpleNamespace(name="fake", options={"x": 1}, device="cpu"), tmp_path, encoder=None)
    assert engine == ("engine", tmp_path / "models", {"x": 1})
    with pytest.raises(ConfigError, match=r"\[engine\] name: unknown engine 'nope' \(registered: fake, kokoro\)"):
        h.create_engine(SimpleNamespace(name="nope", options={}, device="cpu"), tmp_path, encoder=None)

    class Clash:
        @hookimpl
        def voiced_register_engines(self, register: Any) -> None:
            register("kokoro", lambda ctx: None)

    with pytest.raises(ConfigError, match=r"'kokoro' is registered by two plugins: 'builtin' and 'clash'"):
        host(extra=[("clash", Clash())]).register_engines()


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"loudness": {"target_lufz": -16}}, r"\[plugins.loudness\] unknown key 'target_lufz'"),
        ({"loudness": {"target_lufs": "loud"}}, r"\[plugins.loudness\] target_lufs: expected number, got str"),
        ({"loudness": {"target_lufs": 3}}, r"\[plugins.loudness\] target_lufs: must be within"),
        ({"loudness": {"on_error": "ignore"}}, r"\[plugins.loudness\] on_error: must be one of fail, skip"),
        ({"archive": {}}, r"\[plugins.archive\] dir: required"),
        ({"lexicon": {"entries": {"SQL": 1}}}, r"\[plugins.lexicon\] entries.SQL: expected string"),
        ({"lexicon": {"file": "/nonexistent/lex.toml"}}, r"\[plugins.lexicon\] file: cannot read"),
        ({"loudnes": {"target_lufs": -16}}, r"\[plugins.loudnes\]: no plugin named 'loudnes'.*\[plugins.loudness\]"),
    ],
)
def test_settings_errors_name_the_key(settings: dict, message: str) -> None:
    pytest.importorskip("pyloudnorm")
    with pytest.raises(ConfigError, match=message):
        host(("loudness", "lexicon", "archive") if "archive" in settings else ("loudness", "lexicon"), settings=settings)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "words.toml").write_text('kubectl = "cube control"\n')
    h = PluginHost(PluginsConfig(enabled=("lexicon",)), settings={"lexicon": {"file": "words.toml"}},
                   source=tmp_path / "voiced.toml", entry_points=False)
    assert h.settings("lexicon").file == tmp_path / "words.toml"
    assert h.preprocess_text("run kubectl", "alice", {}) == "run cube control"


# ---------------------------------------------------------------------- loudness


def _true_peak_db(audio: np.ndarray) -> float:
    from scipy.signal import resample_poly

    return 20 * np.log10(np.max(np.abs(resample_poly(np.asarray(audio, np.float64), 8, 1))))


@pytest.mark.parametrize(("level", "target", "ceiling"), [(0.03, -16.0, -1.0), (0.99, -23.0, -1.0), (0.5, -12.0, -3.0)])
def test_loudness_reaches_the_target_under_the_ceiling(speech: np.ndarray, level: float, target: float, ceiling: float) -> None:
    pyloudnorm = pytest.importorskip("pyloudnorm")
    h = host(("loudness",), settings={"loudness": {"target_lufs": target, "true_peak_db": ceiling}})
    audio = speech / np.max(np.abs(speech)) * level
    out = h.postprocess_audio(audio, RATE, request())
    assert len(out) == len(audio)
    assert abs(pyloudnorm.Meter(RATE).integrated_loudness(out.astype(np.float64)) - target) < 0.5
    assert _true_peak_db(out) <= ceiling + 0.1  # 8x oversampled measure vs the plugin's 4x


def test_loudness_streams_keep_the_first_chunks_gain(speech: np.ndarray) -> None:
    pytest.importorskip("pyloudnorm")
    h = host(("loudness",), settings={"loudness": {"target_lufs": -20.0, "true_peak_db": -0.1}})
    quiet = speech * 0.1
    first, second = quiet[: 2 * RATE], quiet[2 * RATE : 4 * RATE]
    req = request(stream=True, final=False)
    a = h.postprocess_audio(first, RATE, {**req, "seq": 0})
    b = h.postprocess_audio(second, RATE, {**req, "seq": 1})
    gain_a = np.dot(a, first) / np.dot(first, first)
    gain_b = np.dot(b, second) / np.dot(second, second)
    assert gain_a > 1.5 and gain_b == pytest.approx(gain_a, rel=0.02)
    end = h.postprocess_audio(np.zeros(0, np.float32), RATE, {**req, "seq": 2, "final": True})
    assert len(end) == 0


def test_loudness_leaves_short_and_silent_signals_alone(speech: np.ndarray) -> None:
    pytest.importorskip("pyloudnorm")
    h = host(("loudness",))
    tiny = speech[RATE : RATE + RATE // 100]  # 10 ms
    assert np.array_equal(h.postprocess_audio(tiny, RATE, request()), tiny)
    silence = np.zeros(RATE, np.float32)
    assert np.array_equal(h.postprocess_audio(silence, RATE, request()), silence)
    short = speech[RATE : RATE + RATE // 5] * 0.05  # 200 ms: measured ungated, made louder
    out = h.postprocess_audio(short, RATE, request())
    assert len(out) == len(short) and np.max(np.abs(out)) > 4 * np.max(np.abs(short))


# ---------------------------------------------------------------------- trim


def test_trim_removes_silence_and_adds_padding_and_fades(speech: np.ndarray) -> None:
    settings = {"threshold_db": -45.0, "keep_ms": 20.0, "fade_ms": 10.0, "pad_start_ms": 50.0, "pad_end_ms": 100.0}
    h = host(("trim",), settings={"trim": settings})
    voiced = speech[RATE : 3 * RATE].copy()
    lead, tail = int(0.5 * RATE), int(0.8 * RATE)
    noise = (np.random.default_rng(0).standard_normal(lead + len(voiced) + tail) * 1e-4).astype(np.float32)  # -80 dBFS
    audio = noise.copy()
    audio[lead : lead + len(voiced)] += voiced
    out = h.postprocess_audio(audio, RATE, request())
    from plugins.trim import speech_bounds

    start, end = speech_bounds(voiced, RATE, -45.0)
    expected = (end - start) + 2 * int(0.020 * RATE) + int(0.050 * RATE) + int(0.100 * RATE)
    assert abs(len(out) - expected) <= int(0.010 * RATE)  # frame resolution
    assert len(out) < len(audio) - int(1.0 * RATE)  # most of the 1.3 s of silence is gone
    assert not np.any(out[: int(0.050 * RATE)]) and not np.any(out[-int(0.100 * RATE) :])  # exact padding
    after_pad = out[int(0.050 * RATE) :]
    assert abs(after_pad[0]) < 0.01 * np.max(np.abs(voiced)) + 1e-3  # faded in
    assert h.postprocess_audio(np.zeros(RATE, np.float32), RATE, request()).size == RATE  # silence: unchanged


def test_trim_in_streams_treats_the_start_and_pads_the_end(speech: np.ndarray) -> None:
    h = host(("trim",), settings={"trim": {"pad_start_ms": 50.0, "pad_end_ms": 100.0}})
    chunk = np.concatenate([np.zeros(RATE // 2, np.float32), speech[RATE : 2 * RATE]])
    req = request(stream=True, final=False)
    first = h.postprocess_audio(chunk, RATE, {**req, "seq": 0})
    assert len(first) < len(chunk) - RATE // 3
    middle = h.postprocess_audio(chunk, RATE, {**req, "seq": 1})
    assert np.array_equal(middle, chunk)
    end = h.postprocess_audio(np.zeros(0, np.float32), RATE, {**req, "seq": 2, "final": True})
    assert len(end) == int(0.100 * RATE) and not np.any(end)


# ---------------------------------------------------------------------- lexicon


def test_lexicon_whole_words_and_case() -> None:
    from plugins.lexicon import Lexicon

    lex = Lexicon({"SQL": "sequel", "nginx": "engine x", "US": "United States", "C++": "C plus plus",
                   "new york": "New York City", "new": "old"})
    assert lex.apply("SQL, MySQL and SQLite; (SQL)'s") == "sequel, MySQL and SQLite; (sequel)'s"
    assert lex.apply("sql Sql") == "sql Sql"  # "SQL" has capitals: exact spelling only
    assert lex.apply("nginx Nginx NGINX nginxes") == "engine x engine x engine x nginxes"  # lowercase: any case
    assert lex.apply("us and US") == "us and United States"
    assert lex.apply("I like C++ and C") == "I like C plus plus and C"
    assert lex.apply("New  York is new") == "New York City is old"  # longest first, any whitespace
    assert lex.apply("nothing here") == "nothing here"


def test_lexicon_file_and_inline_entries_and_reload(tmp_path: Path) -> None:
    file = tmp_path / "lexicon.toml"
    file.write_text('kubectl = "cube control"\nSQL = "ess cue ell"\n')
    h = host(("lexicon",), settings={"lexicon": {"file": str(file), "entries": {"SQL": "sequel"}}})
    assert h.preprocess_text("kubectl talks SQL", "alice", {}) == "cube control talks sequel"  # inline wins
    file.write_text('kubectl = "kube cuttle"\n')
    os.utime(file, ns=(1, 10**18))  # a different mtime whatever the clock's resolution
    assert h.preprocess_text("kubectl talks SQL", "alice", {}) == "kube cuttle talks sequel"
    file.write_text("broken = [\n")
    os.utime(file, ns=(1, 2 * 10**18))
    assert h.preprocess_text("kubectl", "alice", {}) == "kube cuttle"  # invalid file: previous entries kept


# ---------------------------------------------------------------------- archive


def test_archive_writes_wav_and_json_atomically(tmp_path: Path, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "archive"
    h = host(("archive",), settings={"archive": {"dir": str(folder)}})
    req = request(text="Hello there", spoken_text="Hello there")
    audio = speech[: RATE]
    h.synthesis_done(req, audio, RATE, {"queue_s": 0.01, "engine_s": 0.5, "total_s": 0.6})
    wavs, metas = sorted(folder.glob("*.wav")), sorted(folder.glob("*.json"))
    assert len(wavs) == 1 and len(metas) == 1 and wavs[0].stem == metas[0].stem
    assert sorted(p.name for p in folder.iterdir()) == sorted([wavs[0].name, metas[0].name])  # no temp files
    data, rate = sf.read(wavs[0], dtype="float32")
    assert rate == RATE and len(data) == len(audio) and np.max(np.abs(data - audio)) < 1e-3
    meta = json.loads(metas[0].read_text())
    assert meta["text"] == "Hello there" and meta["voice"] == {"name": "alice", "sha256": "ab" * 32}
    assert meta["params"] == {"speed": 1.0} and meta["timings"]["engine_s"] == 0.5 and meta["wav"] == wavs[0].name

    # a crash between write and rename leaves no file under the final name, and no temp file
    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    h2 = host(("archive",), settings={"archive": {"dir": str(folder), "on_error": "fail"}})
    h2.synthesis_done(req, audio, RATE, {})  # logged, never raised (the reply is sent)
    assert len(list(folder.iterdir())) == 2
    assert h2.timings()["archive"]["errors"] == 1


def test_archive_enforces_its_size_cap_oldest_first(tmp_path: Path, speech: np.ndarray) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "mine.wav").write_bytes(b"not the archive's")  # foreign files are never touched
    (folder / ".tmp-archive-leftover").write_bytes(b"x")  # a crash's leftover is cleaned
    one_s = RATE * 2  # 16-bit mono
    h = host(("archive",), settings={"archive": {"dir": str(folder), "max_mb": 2.5 * one_s / 2**20}})
    archive = h.get("archive")
    assert not (folder / ".tmp-archive-leftover").exists()
    stems = []
    for i in range(5):
        path = archive.save(request(text=f"reply {i}"), speech[:RATE], RATE, {})
        stems.append(path.stem)
        assert archive.total_bytes() <= 2.5 * one_s
    left = sorted(p.stem for p in folder.glob("*.json"))
    assert left == stems[-2:]  # the two newest fit, the oldest went first
    assert (folder / "mine.wav").exists()
    reopened = host(("archive",), settings={"archive": {"dir": str(folder), "max_mb": 1.2 * one_s / 2**20}})
    assert sorted(p.stem for p in folder.glob("*.json")) == stems[-1:]  # a smaller cap at start
    assert reopened.get("archive").total_bytes() <= 1.2 * one_s


# ---------------------------------------------------------------------- journal


def test_journal_appends_parseable_json_lines(tmp_path: Path) -> None:
    file = tmp_path / "log" / "voices.jsonl"
    h = host(("journal",), settings={"journal": {"file": str(file), "fsync": True}})
    h.voice_event("preparing", {"name": "alice"})  # not journaled
    h.voice_event("ready", {"name": "alice", "file": "alice.wav", "sha256": "ab", "state": "ready", "stage": "quick"})
    h.voice_event("failed", {"name": "bob", "file": "bob.wav", "sha256": "cd", "state": "failed", "error": "too short"})
    file.rename(tmp_path / "log" / "voices.jsonl.1")  # rotated: the next event opens a new file
    h.voice_event("removed", {"name": "alice", "file": "alice.wav", "sha256": "ab", "state": "ready"})
    h.shutdown()
    old = [json.loads(line) for line in (tmp_path / "log" / "voices.jsonl.1").read_text().splitlines()]
    new = [json.loads(line) for line in file.read_text().splitlines()]
    assert [e["event"] for e in old] == ["ready", "failed"] and [e["event"] for e in new] == ["removed"]
    assert old[1]["reason"] == "too short" and old[1]["name"] == "bob" and old[0]["sha256"] == "ab"
    assert old[0]["time"].endswith("+00:00") and old[0]["stage"] == "quick"
