"""What crash files in a run folder say: the filter half of the crash indexer.

faulthandler (enabled by the client into run_dir/crash.log) writes a first line
naming the fatal signal, then the Python stack of every thread.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

from runnerd_client.trust import UntrustedPath, check_own_file

CRASH_LOG = "crash.log"
MAX_READ = 64 * 1024
_FATAL = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}
_OPEN_UNTRUSTED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_untrusted(path: str | Path) -> int:
    """A descriptor to read a file found in a run or watched folder: never through a
    symlink, never a FIFO or device that would block or never end, only a file of ours
    (UntrustedPath otherwise)."""
    try:
        fd = os.open(path, _OPEN_UNTRUSTED)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedPath(path, "it is a symlink") from None
        raise
    try:
        check_own_file(os.fstat(fd), path)
    except UntrustedPath:
        os.close(fd)
        raise
    return fd


def tail(fh: BinaryIO, size: int, limit: int = MAX_READ) -> str:
    """The last `limit` bytes of an open file of `size` bytes as text."""
    fh.seek(max(0, size - limit))
    return fh.read(limit).decode("utf-8", "replace")


def read_tail(path: str | Path, limit: int = MAX_READ) -> str:
    """The last `limit` bytes of a file of ours as text (a core-sized file is never read
    whole)."""
    with os.fdopen(open_untrusted(path), "rb") as fh:
        return tail(fh, os.fstat(fh.fileno()).st_size, limit)


def crash_signal(text: str) -> tuple[str, str] | None:
    """(signal name, first line) if a crash.log's text records a fatal signal."""
    for line in text.splitlines():
        if line.startswith("Fatal Python error: "):
            cause = line.removeprefix("Fatal Python error: ").strip()
            return _FATAL.get(cause, "SIGABRT" if "abort" in cause.lower() else "UNKNOWN"), line
    return None


def native_crash(run_dir: str | None) -> tuple[str, str, str] | None:
    """(signal name, first line, full text) from a run's crash.log, if it records a crash."""
    if not run_dir:
        return None
    try:
        text = read_tail(Path(run_dir) / CRASH_LOG)
    except OSError:
        return None
    found = crash_signal(text)
    return None if found is None else (*found, text)
