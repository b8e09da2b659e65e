"""Speaker embeddings of files, through the content-addressed cache (shared by the daemon and the CLI)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from voiced.audio import LoadedAudio, load_audio
from voiced.store import ArtifactStore, open_store
from voiced.config import Config
from voiced.errors import AudioError, CacheError
from voiced.fsutil import sha256_file

log = logging.getLogger(__name__)


def embedding_kind(preprocess: bool, max_duration_s: float) -> str:
    """The cache kind of an embedding: the settings that change the result are part of the key."""
    return f"embedding/{'pre' if preprocess else 'raw'}/max{max_duration_s:g}s"


def audio_meta(audio: LoadedAudio) -> dict[str, Any]:
    """What the cache keeps beside an embedding about the recording it came from."""
    return {
        "duration_s": audio.source_duration_s,
        "used_s": audio.duration_s,
        "truncated": audio.truncated,
        "sample_rate": audio.source_sample_rate,
        "channels": audio.channels,
    }


@dataclass(frozen=True)
class EmbedResult:
    file: str
    embedding: np.ndarray | None = None
    sha256: str | None = None
    duration_s: float | None = None
    cached: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "sha256": self.sha256}
        if self.error:
            out["error"] = self.error
        else:
            out["duration_s"] = self.duration_s
            out["cached"] = self.cached
            out["embedding"] = [float(x) for x in self.embedding] if self.embedding is not None else None
        return out


def embed_files(
    files: Sequence[Path], config: Config, *, use_cache: bool = True, preprocess: bool = True
) -> list[EmbedResult]:
    """Embed each file; one file's error is reported in its result, the others go on."""
    return list(iter_embeddings(files, config, use_cache=use_cache, preprocess=preprocess))


def iter_embeddings(
    files: Sequence[Path], config: Config, *, use_cache: bool = True, preprocess: bool = True
) -> Iterator[EmbedResult]:
    """embed_files' results one by one, as each file is done (for a progress bar)."""
    from voiced.encoder import SpeakerEncoder

    cache: ArtifactStore | None = None
    if use_cache:
        try:
            config.cache.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            cache = open_store(config.cache.dir, config.cache.size_limit_bytes, config.cache.shared_dir)
        except (OSError, CacheError) as exc:
            log.warning("cache unavailable, embedding without it: %s", exc)
    encoder: SpeakerEncoder | None = None
    kind = embedding_kind(preprocess, config.voices.max_duration_s)
    try:
        for file in files:
            try:
                sha = sha256_file(file)
            except FileNotFoundError:
                yield EmbedResult(str(file), error="no such file")
                continue
            except IsADirectoryError:
                yield EmbedResult(str(file), error="is a folder, not an audio file")
                continue
            except OSError as exc:
                yield EmbedResult(str(file), error=f"cannot read: {exc.strerror or exc}")
                continue
            if encoder is None:
                encoder = SpeakerEncoder.from_config(config.encoder)
            producer = f"{encoder.model_id}@{encoder.version}"
            if cache is not None:
                entry = cache.get_entry(sha, producer, kind)
                if entry is not None:
                    arrays, meta = entry
                    yield EmbedResult(str(file), arrays["embedding"], sha, meta.get("duration_s"), cached=True)
                    continue
            try:
                audio = load_audio(file, max_duration_s=config.voices.max_duration_s)
                embedding = encoder.embed(audio.samples, preprocess=preprocess)
            except AudioError as exc:
                yield EmbedResult(str(file), sha256=sha, error=str(exc))
                continue
            if cache is not None:
                try:
                    cache.put(sha, producer, kind, {"embedding": embedding}, audio_meta(audio))
                except CacheError as exc:
                    log.warning("cannot cache the embedding of %s: %s", file, exc)
            yield EmbedResult(str(file), embedding, sha, audio.source_duration_s)
    finally:
        if cache is not None:
            cache.close()
