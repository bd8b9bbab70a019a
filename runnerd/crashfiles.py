"""What crash files in a run folder say: the filter half of the crash indexer.

faulthandler (enabled by the client into run_dir/crash.log) writes a first line
naming the fatal signal, then the Python stack of every thread.
"""

from __future__ import annotations

import os
from pathlib import Path

CRASH_LOG = "crash.log"
MAX_READ = 64 * 1024
_FATAL = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}


def read_tail(path: Path, limit: int = MAX_READ) -> str:
    """The last `limit` bytes of a file as text (a core-sized file is never read whole)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(0, size - limit))
        return fh.read().decode("utf-8", "replace")


def native_crash(run_dir: str | None) -> tuple[str, str, str] | None:
    """(signal name, first line, full text) from a run's crash.log, if it records a crash."""
    if not run_dir:
        return None
    try:
        text = read_tail(Path(run_dir) / CRASH_LOG)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Fatal Python error: "):
            cause = line.removeprefix("Fatal Python error: ").strip()
            return _FATAL.get(cause, "SIGABRT" if "abort" in cause.lower() else "UNKNOWN"), \
                line, text
    return None
