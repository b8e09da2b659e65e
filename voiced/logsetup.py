"""Logging fit for a terminal and for journald: one event per line, a level on every line."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities, which journald reads from a "<N>" line prefix (SyslogLevelPrefix=)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``, ``\\u202e``).

    A traceback folds onto its event's line, and a voice file named with a newline, a terminal
    escape or a bidi override can neither forge a log line nor drive the terminal showing it.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds its own), the level as a syslog prefix, one line."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{one_line(super().format(record))}"


class OneLineFormatter(logging.Formatter):
    """Tracebacks folded onto the event's line, so one event stays one line for log tools."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def under_journal() -> bool:
    """Whether stderr is connected to the systemd journal (JOURNAL_STREAM names our stderr)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream or ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = stream.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    journal = fmt == "journal" or (fmt == "auto" and under_journal())
    if journal:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # watchdog logs every inotify event at debug; keep ours readable
    logging.getLogger("watchdog").setLevel(max(logging.INFO, root.level))
