"""lexicon: a pronunciation lexicon, applied to the text before the engine reads it.

Entries map a word (or a phrase) to the text to say instead, from a TOML file and/or inline::

    [plugins.lexicon]
    file = "lexicon.toml"                       # relative to the config file's folder
    entries = { SQL = "sequel", nginx = "engine x" }

    # lexicon.toml: one entry per line (quote keys with spaces or punctuation)
    kubectl = "cube control"
    "C++" = "C plus plus"
    "New York" = "New York City"

Matching rules:

* **Whole words only**: an entry matches where it is neither preceded nor followed by a
  letter, digit or underscore ("SQL" matches in "SQL's" and "(SQL)", not in "MySQL").
* **Case**: an entry written with any capital letter matches that exact spelling only
  ("US" matches "US", not "us"); an all-lowercase entry matches any capitalisation
  ("nginx" matches "nginx", "Nginx", "NGINX"). Where both match, the exact one wins.
* **Longest first**: "New York" is tried before "New"; a replacement is not matched again.
* Spaces in a phrase match any run of whitespace.
* Inline ``entries`` override the file's. The file is re-read when it changes (no restart).

Replacements are text. The built-in Kokoro engine reads plain text through espeak-ng and has
no inline-phoneme syntax, so write how the word sounds ("sequel", "engine x"), not IPA.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from voiced.hooks import PluginSettings, hookimpl

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Settings(PluginSettings):
    file: Path | None = None
    """A TOML file of ``word = "replacement"`` lines (re-read when it changes)."""
    entries: Mapping[str, str] = field(default_factory=dict)
    """Inline entries; they override the file's."""


def load_file(path: Path) -> dict[str, str]:
    """Entries of a lexicon file; ValueError naming the file and the bad entry."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"file: not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"file: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"file: {path}: invalid TOML: {exc}") from None
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise ValueError(f"file: {path}: entry {key!r}: the replacement must be a string, got {type(value).__name__}")
        out[key] = value
    return out


class Lexicon:
    """Compiled entries: ``apply(text)`` replaces whole words by the rules above."""

    def __init__(self, entries: Mapping[str, str]) -> None:
        self.exact: dict[str, str] = {}
        self.folded: dict[str, str] = {}
        for key, value in entries.items():
            word = " ".join(str(key).split())
            if not word:
                raise ValueError("entries: an entry's word must not be empty")
            if word == word.lower():
                self.folded[word] = str(value)
            else:
                self.exact[word] = str(value)
        alternatives = [(w, False) for w in self.exact] + [(w, True) for w in self.folded]
        # longest first; for equal words the exact spelling is tried first
        alternatives.sort(key=lambda item: (-len(item[0]), item[1]))
        parts = []
        for word, fold in alternatives:
            body = r"\s+".join(re.escape(piece) for piece in word.split(" "))
            parts.append(f"(?i:{body})" if fold else body)
        self.pattern = re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)") if parts else None

    def __len__(self) -> int:
        return len(self.exact) + len(self.folded)

    def _replace(self, match: re.Match[str]) -> str:
        found = " ".join(match.group(0).split())
        if found in self.exact:
            return self.exact[found]
        return self.folded.get(found.lower(), match.group(0))

    def apply(self, text: str) -> str:
        return text if self.pattern is None else self.pattern.sub(self._replace, text)


class LexiconPlugin:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._file_entries: dict[str, str] = {}
        self.lexicon = Lexicon(dict(settings.entries))
        if settings.file is not None:
            self._reload(initial=True)

    def _reload(self, *, initial: bool = False) -> None:
        path = self.settings.file
        assert path is not None
        try:
            st = os.stat(path)
        except OSError as exc:
            if initial:
                raise ValueError(f"file: cannot read {path}: {exc.strerror or exc}") from None
            if self._stamp is not None:
                log.warning("lexicon: %s is gone; keeping its last entries", path)
                self._stamp = None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            entries = load_file(path)
            lexicon = Lexicon({**entries, **self.settings.entries})
        except ValueError:
            if initial:
                raise
            log.warning("lexicon: %s is invalid; keeping the previous entries", path, exc_info=True)
            self._stamp = stamp
            return
        self._file_entries, self.lexicon, self._stamp = entries, lexicon, stamp
        log.info("lexicon: %d entries (%s)", len(lexicon), path)

    @hookimpl
    def voiced_preprocess_text(self, text: str, voice: str, params: dict[str, Any]) -> str | None:
        if self.settings.file is not None:
            with self._lock:
                self._reload()
        replaced = self.lexicon.apply(text)
        return None if replaced == text else replaced


def plugin(settings: Settings) -> LexiconPlugin:
    return LexiconPlugin(settings)
