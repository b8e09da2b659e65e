"""Logging fit for journald: a level on every line, no timestamp of our own, one event per line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys
from voiced.logsetup import setup_logging
setup_logging("info", "auto")
log = logging.getLogger("voiced.test")
log.info("voice ready: alice")
log.warning("two\\nlines")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
log.info("voice ready: %s", "evil\\x1b[2J\\u202ename\\rFAKE")  # a file name may hold anything
"""


def run(tmp_path: Path, journal: bool) -> list[str]:
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as fh:
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(fh.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # what systemd sets: our stderr's device:inode
        subprocess.run([sys.executable, "-c", SCRIPT], stderr=fh, env=env, check=True, timeout=60)
    return err.read_text().splitlines()


def test_journal_format_when_stderr_is_the_journal(tmp_path: Path) -> None:
    lines = run(tmp_path, journal=True)
    assert len(lines) == 4, lines  # one event per line, tracebacks folded in
    assert lines[0] == "<6>voiced.test: voice ready: alice"
    assert lines[1] == "<4>voiced.test: two\\nlines"
    assert lines[2].startswith("<3>voiced.test: failed\\nTraceback") and "ZeroDivisionError" in lines[2]
    assert lines[3] == "<6>voiced.test: voice ready: evil\\x1b[2J\\u202ename\\rFAKE"  # escaped, not obeyed


def test_text_format_on_a_terminal_or_file(tmp_path: Path) -> None:
    lines = run(tmp_path, journal=False)
    assert len(lines) == 4, lines
    assert " INFO voiced.test: voice ready: alice" in lines[0]
    assert lines[0][:4].isdigit()  # a timestamp of our own where nothing adds one
    assert " ERROR voiced.test: failed\\nTraceback" in lines[2]
