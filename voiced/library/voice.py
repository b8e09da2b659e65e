"""A voice: one reference recording in the watched folder, and where its preparation stands."""

from __future__ import annotations

import enum
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

# Names editors, downloaders and sync tools give files that are still being written.
_TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", ".swx", ".bak", "~")


class VoiceState(str, enum.Enum):
    PENDING = "pending"
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Voice:
    """What the library knows of one file. Mutated only under the library's lock."""

    path: str
    """Relative path below the voices folder, with '/'."""
    name: str
    state: VoiceState = VoiceState.PENDING
    stage: str | None = None
    """The engine's preparation stage reached (e.g. ``quick``, ``refined``); None before any."""
    sha256: str | None = None
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0
    duration_s: float | None = None
    error: str | None = None
    note: str | None = None
    """Something the user should know that is not an error (e.g. only the first 30 s were used)."""
    generation: int = 0
    """Bumped on every change of the file, so a result computed from an older version is discarded."""
    changed_at: float = field(default_factory=time.monotonic)
    progress: tuple[str, float] | None = None
    """While a background stage runs on an engine that reports it: (that stage, share done)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "state": self.state.value,
            "file": self.path,
            "sha256": self.sha256,
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
        }
        if self.stage:
            out["stage"] = self.stage
        if self.error:
            out["error"] = self.error
        if self.note:
            out["note"] = self.note
        if self.progress is not None:
            out["progress"] = {"stage": self.progress[0], "done": round(self.progress[1], 3)}
        return out


def voice_name(rel_path: str) -> str:
    """A voice's name: its relative path without the extension (``en/alice.wav`` -> ``en/alice``).

    In Unicode NFC, the form keyboards type: a file named on macOS (or copied from there) has
    its accents decomposed (NFD), and ``Renée`` typed by a client would not find it.
    """
    path = PurePosixPath(rel_path)
    return normalize_name(str(path.with_suffix("")) if path.suffix else str(path))


def undecodable(rel_path: str) -> bool:
    """Whether a path's bytes are not UTF-8 (Python holds them as lone surrogates): such a name
    can be neither stored in the cache's index nor sent in a reply."""
    try:
        rel_path.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def normalize_name(name: str) -> str:
    """The form voice names are compared in (NFC)."""
    return unicodedata.normalize("NFC", name)


def is_candidate(rel_path: str, extensions: tuple[str, ...]) -> bool:
    """Whether a relative path can be a reference recording (not hidden, not temporary, audio
    extension, a name that is text: see ``undecodable``)."""
    if undecodable(rel_path):
        return False
    parts = PurePosixPath(rel_path).parts
    if not parts or any(part.startswith((".", "#")) for part in parts):
        return False
    leaf = parts[-1].lower()
    if leaf.endswith(_TEMP_SUFFIXES) or leaf.startswith("~$"):
        return False
    suffix = PurePosixPath(leaf).suffix
    return bool(suffix) and suffix[1:] in {ext.lower().lstrip(".") for ext in extensions}
