"""Text -> Kokoro phonemes: espeak-ng's IPA (:mod:`voiced.engines.espeak`) in Kokoro's notation.

espeak-ng drops punctuation, yet Kokoro uses it for prosody: text is therefore split at
punctuation here, each run of words is phonemised on its own and the marks are put back
between them.

The IPA is then rewritten to the notation Kokoro v1.0 was trained on (misaki's): diphthongs and
affricates as single letters (aɪ -> I, oʊ -> O, tʃ -> ʧ ...) and, for English, the American fixes
misaki applies to espeak output (r -> ɹ, ɚ -> əɹ, flap ɾ -> T, length marks dropped ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from voiced.engines.espeak import TIE, Espeak

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


def to_kokoro(ipa: str, lang: str) -> str:
    """Rewrite espeak IPA into Kokoro's notation (before filtering by the vocabulary)."""
    ipa = _LANG_FLAG.sub("", ipa)
    english = lang.lower().startswith("en")
    for old, new in _ENGLISH_ORDERED if english else _COMMON_ORDERED:
        ipa = ipa.replace(old, new)
    ipa = re.sub(r"(\S)\u0329", r"ᵊ\1", ipa).replace("\u0329", "")
    if english:
        ipa = ipa.replace("ɪə", "iə").replace("ː", "")
    return ipa.replace(TIE, "")


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
