"""Watch the voices folder and tell the library when a file is complete, moved or gone.

A file is handed to the library only once it is complete: when the writer closes it
(inotify's close-after-write), when it is renamed into place (editors' save-by-rename,
rsync's hidden temp file, ``mv`` from elsewhere), or, for writers that do neither and for
the polling observer, once its size and mtime have not changed for ``settle_s``.
Kernel queue overflows and a periodic safety rescan fall back to a full reconcile, which
is cheap: unchanged files are recognised by size, mtime and inode, never re-hashed.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from voiced.config import VoicesConfig
from voiced.library import Library

log = logging.getLogger(__name__)

_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


class FolderWatcher:
    """Owns the watchdog observer, the settle tracker and the safety rescans for one folder."""

    def __init__(self, library: Library, config: VoicesConfig) -> None:
        self.library = library
        self.config = config
        self.root = Path(config.dir)
        self._root_str = os.path.abspath(self.root)
        self._observer: BaseObserver | None = None
        self.observer_kind = ""
        self._settle = SettleTracker(self.root, config.settle_s, self._settled)
        self._stop = threading.Event()
        self._rescan_now = threading.Event()
        self._rescanner: threading.Thread | None = None
        self._overflow_filter = _OverflowFilter(self.request_rescan)
        self.rescans = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start observing, then reconcile: events during the reconcile are not lost."""
        self._stop.clear()
        self._settle.start()
        self._start_observer()
        logging.getLogger(_OVERFLOW_LOGGER).addFilter(self._overflow_filter)
        self.rescan()
        self._rescanner = threading.Thread(target=self._run_rescans, name="voiced-rescan", daemon=True)
        self._rescanner.start()

    def stop(self) -> None:
        self._stop.set()
        self._rescan_now.set()
        logging.getLogger(_OVERFLOW_LOGGER).removeFilter(self._overflow_filter)
        self._stop_observer()
        self._settle.stop()
        if self._rescanner is not None:
            self._rescanner.join(5)
            self._rescanner = None

    def request_rescan(self) -> None:
        """Ask for a full reconcile soon (after an inotify queue overflow, a SIGHUP, ...)."""
        self._rescan_now.set()

    def rescan(self) -> None:
        report, recent = self.library.reconcile(recent_s=self.config.settle_s)
        self.rescans += 1
        for path in recent:
            self._settle.track(path)

    def pending_settle(self) -> int:
        return len(self._settle)

    # ------------------------------------------------------------------ observer

    def _start_observer(self) -> None:
        handler = _Handler(self)
        kind = self.config.observer
        if kind in ("auto", "inotify"):
            try:
                observer = _native_observer()
                observer.schedule(handler, self._root_str, recursive=True)
                observer.start()
                self._observer, self.observer_kind = observer, type(observer).__name__
                log.info("watching %s with %s", self._root_str, self.observer_kind)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOSYS):
                    raise
                log.warning(
                    "inotify unavailable (%s: %s); falling back to polling every %.1fs. "
                    "Raise fs.inotify.max_user_watches / max_user_instances to use inotify.",
                    errno.errorcode.get(exc.errno or 0, exc.errno), exc.strerror, self.config.poll_interval_s,
                )
        observer = PollingObserver(timeout=self.config.poll_interval_s)
        observer.schedule(handler, self._root_str, recursive=True)
        observer.start()
        self._observer, self.observer_kind = observer, "PollingObserver"
        log.info("watching %s by polling every %.1fs", self._root_str, self.config.poll_interval_s)

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(5)

    def _run_rescans(self) -> None:
        interval = self.config.rescan_interval_s
        while not self._stop.is_set():
            self._rescan_now.wait(interval if interval > 0 else None)
            if self._stop.is_set():
                return
            self._rescan_now.clear()
            try:
                if not self.root.is_dir():
                    log.warning("voices folder %s is gone; waiting for it to come back", self.root)
                    self.library.remove_tree("")
                    self._wait_for_root()
                    continue
                if self._observer is not None and not self._observer.is_alive():
                    self._restart_observer()
                self.rescan()
            except Exception:  # the rescanner must outlive any one failure
                log.exception("rescan failed")

    def _wait_for_root(self) -> None:
        while not self._stop.is_set() and not self.root.is_dir():
            self._stop.wait(self.config.poll_interval_s)
        if not self._stop.is_set():
            log.info("voices folder %s is back", self.root)
            self._restart_observer()
            self.rescan()

    def _restart_observer(self) -> None:
        self._stop_observer()
        self._start_observer()

    # ------------------------------------------------------------------ events

    def relative(self, path: str | bytes) -> str | None:
        """The path below the folder, with '/', or None for paths outside it (or the folder itself)."""
        text = os.fsdecode(path)
        if not text:
            return None
        rel = os.path.relpath(text, self._root_str)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return None
        return rel.replace(os.sep, "/")

    def _settled(self, path: str) -> None:
        self.library.sync_path(path)

    def on_event(self, event: FileSystemEvent) -> None:
        src = self.relative(event.src_path)
        dest = self.relative(getattr(event, "dest_path", "") or "")
        if isinstance(event, FileMovedEvent):
            # destination first: while the source voice still exists, a move is recognised by its
            # inode and the voice is ready again without hashing
            if dest is not None:
                self.library.sync_path(dest)
                self._settle.discard(dest)
            if src is not None:
                self.library.sync_path(src)
                self._settle.discard(src)
        elif isinstance(event, DirMovedEvent):
            if dest is not None:
                self.library.sync_tree(dest)
            if src is not None:
                self.library.remove_tree(src)
        elif isinstance(event, DirDeletedEvent):
            if src is None:
                self.request_rescan()  # the folder itself went away
            else:
                self.library.remove_tree(src)
        elif isinstance(event, DirCreatedEvent):
            if src is not None:
                self.library.sync_tree(src)
        elif src is None or not self.library.accepts(src):
            return
        elif isinstance(event, (FileClosedEvent, FileDeletedEvent)):
            # the library first, then the tracker: a file is never in neither (pending_settle
            # counts the voices still to come)
            self.library.sync_path(src)
            self._settle.discard(src)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self._settle.track(src)


def _native_observer() -> BaseObserver:
    """inotify with unmatched moves reported as moves, so a file renamed into the folder is complete."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux: watchdog's platform default (it reports close events where it can)
        from watchdog.observers import Observer

        return Observer()
    return InotifyObserver(generate_full_events=True)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self.watcher.on_event(event)
        except Exception:  # an exception here would kill watchdog's dispatch thread
            log.exception("error handling %s", event)


class _OverflowFilter(logging.Filter):
    """watchdog reports a kernel queue overflow only by logging it; turn that into a rescan."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self.on_overflow = on_overflow

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()
        return True


class SettleTracker:
    """Calls ``on_settled(path)`` once a file's size and mtime stayed the same for ``settle_s``."""

    def __init__(self, root: Path, settle_s: float, on_settled: Callable[[str], None]) -> None:
        self.root = root
        self.settle_s = settle_s
        self.on_settled = on_settled
        self._lock = threading.Condition()
        self._entries: dict[str, tuple[float, tuple[int, int] | None]] = {}
        self._heap: list[tuple[float, str]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._handing = 0  # settled, on_settled not yet returned

    def __len__(self) -> int:
        """Files being tracked, and those settled but not yet handed over."""
        with self._lock:
            return len(self._entries) + self._handing

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="voiced-settle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def track(self, path: str) -> None:
        """The file changed now: (re)start its quiet period."""
        due = time.monotonic() + self.settle_s
        signature = self._signature(path)
        with self._lock:
            self._entries[path] = (due, signature)
            heapq.heappush(self._heap, (due, path))
            self._lock.notify_all()

    def discard(self, path: str) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping:
                    now = time.monotonic()
                    while self._heap and (
                        self._heap[0][1] not in self._entries or self._entries[self._heap[0][1]][0] != self._heap[0][0]
                    ):
                        heapq.heappop(self._heap)  # superseded by a later track() or discarded
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._lock.wait(self._heap[0][0] - now if self._heap else None)
                if self._stopping:
                    return
                _, path = heapq.heappop(self._heap)
                _, last = self._entries[path]
            current = self._signature(path)
            with self._lock:
                entry = self._entries.get(path)
                if entry is None or entry[1] != last:
                    continue  # discarded or re-tracked meanwhile
                if current is not None and current != last:
                    # changed without an event (polling, or a writer on another host): wait again
                    due = time.monotonic() + self.settle_s
                    self._entries[path] = (due, current)
                    heapq.heappush(self._heap, (due, path))
                    continue
                del self._entries[path]
                self._handing += 1
            try:
                self.on_settled(path)
            except Exception:
                log.exception("error handling settled file %s", path)
            finally:
                with self._lock:
                    self._handing -= 1

    def _signature(self, path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root / path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns)
