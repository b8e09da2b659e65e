"""Faults the daemon must survive without losing anything, each made real rather than simulated:

* the cache's filesystem full (a small tmpfs filled to the last byte), then room again;
* the cache's filesystem remounted read-only under the running daemon, then read-write again;
* a cache object corrupted by hand while the daemon is down;
* the voices folder deleted and recreated;
* inotify instances exhausted for the user before the daemon starts;
* the engine raising in the middle of a request (an engine plugin that fails after one sentence).

The tmpfs cases need mount(8) and root; they skip, saying so, where that is not allowed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from cachecheck import cache_problems

from voiced.store.local import INDEX_NAME, OBJECTS_DIR
from voiced.client import RequestError
from voiced.fsutil import sha256_file
from voiced.protocol import ERROR_CODES
from voiced.testing import DaemonProcess

FLAKY_ENGINE = '''
"""An engine that fails in the middle of a request: Kokoro, raising after the first sentence of
any text that asks for it."""
from voiced.engines.kokoro import KokoroEngine
from voiced.hooks import hookimpl


class FlakyKokoro(KokoroEngine):
    def synthesize(self, text, conditioning, params):
        for index, chunk in enumerate(super().synthesize(text, conditioning, params)):
            if index == 1 and "explode" in text:
                raise RuntimeError("injected engine fault after the first sentence")
            yield chunk


@hookimpl
def voiced_register_engines(register):
    register("flaky", lambda context: FlakyKokoro(context.models_dir, encoder=context.encoder))
'''


def faults_row(report: Any, name: str, held: bool, lost: int = 0) -> None:
    row = report.row("faults")
    row.tried += 1
    row.held += int(held)
    row.lost += lost
    row.notes.append(name)


def wait_until(predicate: Any, timeout_s: float, what: str, daemon: DaemonProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s}s\n{daemon.log_tail()}")
        time.sleep(0.2)


def voice(daemon: DaemonProcess, name: str) -> dict[str, Any] | None:
    with daemon.client(timeout_s=30) as client:
        return next((v for v in client.voices() if v["name"] == name), None)


def entry_kinds(cache_dir: Path, sha: str) -> set[str]:
    db = sqlite3.connect(f"file:{cache_dir / INDEX_NAME}?mode=ro", uri=True)
    try:
        return {kind for (kind,) in db.execute("SELECT kind FROM entries WHERE source = ?", (sha,))}
    finally:
        db.close()


def assert_all_stored(daemon: DaemonProcess, cache_dir: Path) -> None:
    """With the daemon stopped: every voice's embedding and conditioning on disk, nothing wrong."""
    shas = {sha256_file(p) for p in daemon.voices.iterdir()}
    for sha in shas:
        assert len(entry_kinds(cache_dir, sha)) >= 2, "embedding and conditioning were not stored"
    problems = cache_problems(cache_dir, shas)
    assert not any(problems.values()), problems


# ---------------------------------------------------------------------------- one daemon, flaky engine


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("faults")
    (root / "plugins").mkdir()
    (root / "plugins" / "flaky_engine.py").write_text(FLAKY_ENGINE)
    d = DaemonProcess(root, {
        "voices": {"poll_interval_s": 0.5},
        "engine": {"name": "flaky", "refine_budget_s": 0.0},
        "plugins": {"paths": [root / "plugins"]},
    }).start()
    yield d
    assert d.stop() == 0, d.log_tail()


@pytest.fixture(scope="module")
def clips(testdata_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in (testdata_dir / "voices").iterdir()}


def test_engine_raising_mid_request(daemon: DaemonProcess, clips: dict[str, Path], report: Any) -> None:
    shutil.copyfile(clips["carlo_a"], daemon.voices / "carlo.wav")
    daemon.wait_ready("carlo")
    text = "This first sentence is spoken. The second one will explode."
    with daemon.client() as client:
        with pytest.raises(RequestError) as failed:
            client.synthesize(text, voice="carlo", format="wav")
        assert failed.value.code in ERROR_CODES and failed.value.code != "bad_request"
        assert "injected engine fault" in str(failed.value) or failed.value.code == "internal"
        # streaming: the first sentence arrives, then the error, never a silent truncation
        chunks = []
        with pytest.raises(RequestError):
            for chunk in client.stream(text, voice="carlo"):
                chunks.append(chunk)
        assert len(chunks) >= 1
        # the next request works, on the same connection
        ok = client.synthesize("And now all is well.", voice="carlo", format="wav")
        assert len(ok.audio) > 1000
        assert client.status()["requests"]["failed"] >= 2
    faults_row(report, "engine raising mid-request (plain and streamed)", True)


def test_voices_folder_deleted_and_recreated(daemon: DaemonProcess, clips: dict[str, Path], report: Any) -> None:
    shutil.copyfile(clips["june_a"], daemon.voices / "june.wav")
    daemon.wait_ready("june")
    shutil.rmtree(daemon.voices)
    daemon.wait_voice("june", lambda v: v is None, timeout_s=60)
    daemon.wait_voice("carlo", lambda v: v is None, timeout_s=60)
    # the files' own delete events can remove the voices before the rescanner sees the folder gone
    wait_until(lambda: "is gone" in daemon.log_tail(20000), 30, "the missing folder noticed", daemon)
    daemon.voices.mkdir()
    shutil.copyfile(clips["june_b"], daemon.voices / "june.wav")
    shutil.copyfile(clips["carlo_a"], daemon.voices / "carlo.wav")
    june = daemon.wait_ready("june")
    daemon.wait_ready("carlo")
    assert june["sha256"] == sha256_file(clips["june_b"])
    # still watched: a file dropped now is noticed too
    shutil.copyfile(clips["allison_a"], daemon.voices / "allison.wav")
    daemon.wait_ready("allison")
    with daemon.client() as client:
        assert len(client.synthesize("The folder came back.", voice="june", format="wav").audio) > 1000
    faults_row(report, "voices folder deleted and recreated", True)


def test_corrupted_cache_object_is_detected_and_rebuilt(daemon: DaemonProcess, report: Any) -> None:
    """Runs last in this module: it restarts the shared daemon."""
    daemon.wait_ready("allison")
    sha = sha256_file(daemon.voices / "allison.wav")
    assert daemon.stop() == 0
    db = sqlite3.connect(daemon.cache_dir / INDEX_NAME)
    objects = [name for (name,) in db.execute("SELECT object FROM entries WHERE source = ?", (sha,))]
    db.close()
    assert len(objects) >= 2  # the embedding and the engine's conditioning
    for name in objects:
        path = daemon.cache_dir / OBJECTS_DIR / name[:2] / f"{name}.npz"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
        path.write_bytes(bytes(data))
    daemon.start()
    daemon.wait_ready("allison")  # the index still lists the entries: the damage shows on first use
    with daemon.client() as client:
        try:
            client.synthesize("Found out.", voice="allison", format="wav")
        except RequestError as exc:  # the one answer a user may see: not ready, being prepared again
            assert exc.code == "voice_not_ready" and exc.header["error"]["state"] in ("pending", "preparing"), exc
        reply = client.synthesize("Rebuilt from the recording.", voice="allison", format="wav", wait_s=120)
        assert len(reply.audio) > 1000
    wait_until(lambda: "checksum mismatch" in daemon.log_tail(50000), 30, "a logged corruption", daemon)
    assert daemon.stop() == 0
    current = {sha256_file(p) for p in daemon.voices.iterdir()}
    problems = cache_problems(daemon.cache_dir, current)
    assert not any(problems.values()), problems
    assert len(entry_kinds(daemon.cache_dir, sha)) >= 2, "the corrupted entries were not rebuilt"
    daemon.start()  # the module fixture stops it
    faults_row(report, "cache object corrupted by hand", True)


# ---------------------------------------------------------------------------- inotify exhausted


def test_inotify_exhausted_falls_back_to_polling(tmp_path: Path, testdata_dir: Path, report: Any) -> None:
    limit_file = Path("/proc/sys/fs/inotify/max_user_instances")
    if not limit_file.exists():
        pytest.skip("no inotify here")
    limit = int(limit_file.read_text())
    if limit > 60000:
        pytest.skip(f"max_user_instances is {limit}: too many to exhaust in a test")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, limit + 256)), hard))
    libc = ctypes.CDLL(None, use_errno=True)
    held: list[int] = []
    daemon = DaemonProcess(tmp_path, {"voices": {"poll_interval_s": 0.5}, "engine": {"refine_budget_s": 0.0}})
    try:
        while True:
            fd = libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                err = ctypes.get_errno()
                assert err == errno.EMFILE, os.strerror(err)
                break
            held.append(fd)
            assert len(held) <= limit, "inotify instances are not limited as /proc says"
        daemon.start()
        log = daemon.log_tail(50000)
        assert "falling back to polling" in log, log
        shutil.copyfile(testdata_dir / "voices" / "carlo_b.ogg", daemon.voices / "carlo.ogg")
        daemon.wait_ready("carlo")
        (daemon.voices / "carlo.ogg").unlink()
        daemon.wait_voice("carlo", lambda v: v is None, timeout_s=30)
    finally:
        for fd in held:
            os.close(fd)
        code = daemon.stop()
    assert code == 0
    faults_row(report, f"inotify instances exhausted ({len(held)} held)", True)


# ---------------------------------------------------------------------------- a small, full or read-only cache


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB tmpfs (the joined model takes 92 MB of it)."""
    mount_point = tmp_path / "cachefs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m,mode=0700", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class KeptFull:
    """Fills a filesystem to the last byte and keeps it full until ``stop()``.

    The daemon's own housekeeping (SQLite closing its write-ahead log, say) can free a few
    pages at any moment; taking them back at once keeps the test about a full disk.
    """

    def __init__(self, folder: Path) -> None:
        self.filler = folder / "filler"
        self._fh = open(self.filler, "wb", buffering=0)
        self._stop = threading.Event()
        self._top_up((1 << 20, 65536, 4096, 512, 1))
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()

    def _top_up(self, sizes: tuple[int, ...]) -> None:
        for size in sizes:
            try:
                while True:
                    self._fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc

    def _keep(self) -> None:
        while not self._stop.wait(0.02):
            self._top_up((4096, 512, 1))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._fh.close()


def test_cache_full_then_room_again(small_fs: Path, tmp_path: Path, clip_maker: Any, report: Any) -> None:
    daemon = DaemonProcess(tmp_path / "d", {
        "cache": {"dir": small_fs / "cache"},
        "engine": {"refine_budget_s": 0.0},
    }).start()
    rng = np.random.default_rng(7)
    full: KeptFull | None = None
    try:
        full = KeptFull(small_fs)
        for name in ("full-1", "full-2"):
            clip_maker.write(daemon.voices / f"{name}.wav", rng)
        for name in ("full-1", "full-2"):
            daemon.wait_ready(name)
            # a voice is published ready before its results are stored (no wait for the cache's
            # fsyncs); the note on what could not be stored follows
            wait_until(lambda name=name: "not cached" in ((voice(daemon, name) or {}).get("note") or ""), 30,
                       f"{name} noted as not cached", daemon)
        with daemon.client() as client:
            assert len(client.synthesize("Served from memory.", voice="full-1", format="wav").audio) > 1000
            assert client.ping()
        assert "No space left" in daemon.log_tail(50000)
        full.stop()
        full.filler.unlink()
        for name in ("full-1", "full-2"):  # stored once there is room, no restart needed
            daemon.wait_voice(name, lambda v: v is not None and "not cached" not in (v.get("note") or ""), 30)
        time.sleep(3.0)  # several garbage collections, well past rename_grace_s: nothing may go
    finally:
        if full is not None:
            full.stop()
        assert daemon.stop() == 0, daemon.log_tail()
    assert_all_stored(daemon, small_fs / "cache")
    faults_row(report, "cache filesystem full, then room again", True)


def test_cache_read_only_then_writable(small_fs: Path, tmp_path: Path, clip_maker: Any, report: Any) -> None:
    """A cache that is read-only when the daemon starts (a full disk remounted ro, a read-only image)."""
    rng = np.random.default_rng(8)
    daemon = DaemonProcess(tmp_path / "d", {
        "cache": {"dir": small_fs / "cache"},
        "engine": {"refine_budget_s": 0.0},
    })
    clip_maker.write(daemon.voices / "before.wav", rng)
    daemon.start()
    daemon.wait_ready("before")
    assert daemon.stop() == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        daemon.start()
        assert daemon.wait_ready("before")
        clip_maker.write(daemon.voices / "during.wav", rng)
        daemon.wait_ready("during")
        # the voice is published ready before the store is tried, and its note follows the
        # refusal a moment later: wait for it rather than catch the moment in between
        during = daemon.wait_voice("during", lambda v: v is not None and "not cached" in (v.get("note") or ""), 30)
        assert during is not None and during["state"] == "ready", during
        with daemon.client() as client:
            for name in ("before", "during"):
                assert len(client.synthesize("Read only, still speaking.", voice=name, format="wav").audio) > 1000
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    # writable again: what was refused is stored without a restart
    daemon.wait_voice("during", lambda v: v is not None and "not cached" not in (v.get("note") or ""), 30)
    time.sleep(3.0)  # several garbage collections, well past rename_grace_s: nothing may go
    assert daemon.stop() == 0, daemon.log_tail()
    assert_all_stored(daemon, small_fs / "cache")
    faults_row(report, "cache filesystem read-only, then writable", True)
