"""Reading a daemon's cache straight from disk (with the daemon stopped) to find what is wrong."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

from voiced.library import files as file_records
from voiced.store.local import INDEX_NAME, OBJECTS_DIR, TEMP_FILE_MAX_AGE_S


def cache_problems(cache_dir: Path, current: set[str]) -> dict[str, list[str]]:
    """Corrupt, dangling, stale and orphaned entries, read from the index and objects directly."""
    problems: dict[str, list[str]] = {"corrupt": [], "dangling": [], "stale": [], "orphaned": [], "files": []}
    db = sqlite3.connect(f"file:{cache_dir / INDEX_NAME}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT source, producer, kind, object, object_sha256, size FROM entries").fetchall()
        held = {r[0] for r in db.execute("SELECT source FROM holds")}
        totals = db.execute("SELECT entries, bytes FROM totals").fetchone()
    finally:
        db.close()
    files: list[tuple[str, str]] = []
    if (cache_dir / file_records.NAME).exists():
        db = sqlite3.connect(f"file:{cache_dir / file_records.NAME}?mode=ro", uri=True)
        try:
            files = db.execute("SELECT path, sha256 FROM files").fetchall()
        finally:
            db.close()
    objects = cache_dir / OBJECTS_DIR
    known = set()
    for source, producer, kind, name, digest, size in rows:
        known.add(name)
        path = objects / name[:2] / f"{name}.npz"
        if not path.exists():
            problems["dangling"].append(f"{source[:12]} {kind}: object {name} missing")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest or len(data) != size:
            problems["corrupt"].append(f"{source[:12]} {kind}: object {name} does not match its checksum")
        if source not in current:
            problems["stale"].append(f"{source[:12]} {kind}: no file has this content any more")
    if totals != (len(rows), sum(r[5] for r in rows)):
        problems["corrupt"].append(f"running totals {totals} disagree with the rows")
    now = time.time()
    for path in objects.rglob("*"):
        if path.is_dir():
            continue
        if path.name.startswith("tmp-"):
            if now - path.stat().st_mtime > TEMP_FILE_MAX_AGE_S:
                problems["orphaned"].append(f"old temp file {path.name}")
        elif path.stem not in known:
            problems["orphaned"].append(f"object {path.name} has no entry")
    for rel, sha in files:
        if sha not in current:
            problems["files"].append(f"file record {rel} has an old hash")
        elif sha not in held:
            problems["files"].append(f"file record {rel}: the store does not hold its content")
    return problems
