"""libespeak-ng (from ``espeakng-loader``) through ctypes: text -> IPA, for any engine's front end.

espeak-ng keeps global state (current voice, the text pointer it walks) and is not thread-safe,
so every call goes through one process-wide lock. Multi-letter phonemes come out joined by
:data:`TIE` (``t^ʃ``), so an engine can map them to its own notation.
"""

from __future__ import annotations

import ctypes
import threading

from voiced.engines.base import TextError

_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the daemon
_CHARS_UTF8 = 1
TIE = "^"
# bit 1: IPA; bit 7: put the character in bits 8-23 between the letters of one phoneme, so
# multi-letter phonemes (t^ʃ, a^ɪ) can be told from two phonemes in a row (t ʃ in "outshine").
_PHONEME_MODE = 0x02 | 0x80 | (ord(TIE) << 8)


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
