"""Text -> Kokoro phonemes through libespeak-ng (from ``espeakng-loader``), via ctypes.

espeak-ng keeps global state (current voice, the text pointer it walks) and is not thread-safe,
so every call goes through one process-wide lock. ``espeak_TextToPhonemes`` drops punctuation,
yet Kokoro uses it for prosody: text is therefore split at punctuation here, each run of words is
phonemised on its own and the marks are put back between them.

The IPA is then rewritten to the notation Kokoro v1.0 was trained on (misaki's): diphthongs and
affricates as single letters (aɪ -> I, oʊ -> O, tʃ -> ʧ ...) and, for English, the American fixes
misaki applies to espeak output (r -> ɹ, ɚ -> əɹ, flap ɾ -> T, length marks dropped ...).
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Mapping

from voiced.engines.base import TextError

log = logging.getLogger(__name__)

_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the daemon
_CHARS_UTF8 = 1
_TIE = "^"
# bit 1: IPA; bit 7: put the character in bits 8-23 between the letters of one phoneme, so
# multi-letter phonemes (t^ʃ, a^ɪ) can be told from two phonemes in a row (t ʃ in "outshine").
_PHONEME_MODE = 0x02 | 0x80 | (ord(_TIE) << 8)

# Punctuation Kokoro has tokens for; other marks are normalised away before this module.
PUNCTUATION = ';:,.!?—…"()“”'
_PUNCT_RUN = re.compile(r"([;:,.!?—…\"()“”]+)")
_LANG_FLAG = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9]+)*\)")  # espeak's "(en)...(fr)" switch markers

# misaki's espeak -> Kokoro map, longest keys first so "a^ɪ" wins over "a".
_COMMON = {
    "a^ɪ": "I", "a^ʊ": "W", "d^z": "ʣ", "d^ʒ": "ʤ", "e^ɪ": "A", "o^ʊ": "O", "ə^ʊ": "Q",
    "s^s": "S", "t^s": "ʦ", "t^ʃ": "ʧ", "ɔ^ɪ": "Y",
}
_ENGLISH = {
    **_COMMON,
    "ʔˌn\u0329": "tᵊn", "ʔn\u0329": "tᵊn", "ʔn": "tᵊn", "ʔ": "t",
    "e": "A", "r": "ɹ", "x": "k", "ç": "k", "ɐ": "ə", "ə^l": "ᵊl", "ɚ": "əɹ", "ɬ": "l",
    "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ", "ɪ^ə": "iə", "ʊ^ə": "ʊə", "ɪː": "i", "ɾ": "T",
    "ʲO": "jO", "ʲQ": "jQ", "ʲ": "",
}


def _ordered(table: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(table.items(), key=lambda kv: -len(kv[0])))


_COMMON_ORDERED = _ordered(_COMMON)
_ENGLISH_ORDERED = _ordered(_ENGLISH)


class Espeak:
    """A process-wide handle on libespeak-ng; use ``Espeak.get()``."""

    _instance: Espeak | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader  # small module: two path helpers, no side effects
        except ImportError as exc:  # pragma: no cover - packaging error
            raise TextError("espeak-ng is missing: pip install espeakng-loader") from exc
        self.lock = threading.Lock()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        data = espeakng_loader.get_data_path().encode()
        if lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_DONT_EXIT) <= 0:
            raise TextError("espeak-ng failed to initialise (espeak-ng-data unreadable?)")
        self._lib = lib
        self._voice: str | None = None

    @classmethod
    def get(cls) -> Espeak:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _set_voice(self, lang: str) -> None:
        if lang == self._voice:
            return
        # espeak names some voices by language only ("fr", not "fr-fr"): try the full code first.
        candidates = [lang] + ([lang.split("-")[0]] if "-" in lang else [])
        for name in candidates:
            if self._lib.espeak_SetVoiceByName(name.encode("ascii", "ignore")) == 0:
                self._voice = lang
                return
        raise TextError(f"language {lang!r} is not supported by espeak-ng")

    def ipa(self, text: str, lang: str) -> str:
        """IPA of ``text`` (no punctuation kept), with stress marks and '^' ties."""
        with self.lock:
            self._set_voice(lang)
            buf = ctypes.c_char_p(text.encode("utf-8"))
            ptr = ctypes.pointer(buf)
            clauses: list[str] = []
            # espeak returns one clause per call and advances the pointer, NULL at the end.
            while ptr.contents.value:
                out = self._lib.espeak_TextToPhonemes(ptr, _CHARS_UTF8, _PHONEME_MODE)
                if out:
                    clauses.append(out.decode("utf-8", "replace"))
        return " ".join(c.strip() for c in clauses if c.strip())


def to_kokoro(ipa: str, lang: str) -> str:
    """Rewrite espeak IPA into Kokoro's notation (before filtering by the vocabulary)."""
    ipa = _LANG_FLAG.sub("", ipa)
    english = lang.lower().startswith("en")
    for old, new in _ENGLISH_ORDERED if english else _COMMON_ORDERED:
        ipa = ipa.replace(old, new)
    ipa = re.sub(r"(\S)\u0329", r"ᵊ\1", ipa).replace("\u0329", "")
    if english:
        ipa = ipa.replace("ɪə", "iə").replace("ː", "")
    return ipa.replace(_TIE, "")


def phonemize(text: str, lang: str, vocab: Mapping[str, int]) -> str:
    """Kokoro phoneme string for normalised ``text``: only characters in ``vocab``.

    Punctuation in PUNCTUATION is kept (attached as Kokoro expects: "wˈɜɹld, ðɪs"); empty
    output means nothing was pronounceable.
    """
    espeak = Espeak.get()
    pieces: list[str] = []
    for i, seg in enumerate(_PUNCT_RUN.split(text)):
        if i % 2:  # a run of punctuation
            pieces.append(seg)
        elif seg.strip():
            ps = to_kokoro(espeak.ipa(seg, lang), lang)
            pieces.append(f" {ps} ")
    ps = "".join(pieces)
    ps = "".join(ch for ch in ps if ch in vocab)
    ps = re.sub(r"\s+", " ", ps)
    ps = re.sub(r" ([;:,.!?…”)])", r"\1", ps)  # closing marks hug the word before
    ps = re.sub(r"([“(]) ", r"\1", ps)  # opening marks hug the word after
    ps = ps.strip()
    if not any(ch not in PUNCTUATION and not ch.isspace() for ch in ps):
        return ""
    return ps
