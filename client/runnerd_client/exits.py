"""How a process's end reaches its run: the one place that decides it.

A `with rd.run()` block (and the MLflow and Hydra integrations) turns SIGTERM into the
exception `Terminated`, so that `finally` blocks run and the run is recorded abandoned
rather than lost; the exception the block ends with says how the run ends (`ending`); a
crash Python cannot see (a segfault, an abort) leaves a native traceback in crash.log.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from runnerd_client import trust
from runnerd_client.enums import FailReason

log = logging.getLogger("runnerd_client")
CRASH_LOG = "crash.log"


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so `with rd.run()` records the run abandoned."""

    failure_class = "Terminated"
    message = "terminated by SIGTERM"
    cause: str | None = None

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def catch_sigterm(handler: Callable[[int, FrameType | None], Any]) -> bool:
    """Handle SIGTERM with `handler` (which raises, so the program's own exit path runs),
    unless the program handles SIGTERM itself; only the main thread may set a handler.
    True if `handler` was set: `release_sigterm` gives SIGTERM its default back."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, handler)
        return True
    return False


def release_sigterm() -> None:
    """Undo a `catch_sigterm` that returned True: SIGTERM kills the process again."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass(frozen=True)
class Ending:
    """How an exception fails its run; a field left None is taken from the exception."""

    reason: str
    failure_class: str | None = None
    message: str | None = None
    cause: str | None = None
    exit_code: int | None = None


def ending(exc: BaseException | None) -> Ending | None:
    """None if a block ending with `exc` ended well (no exception, or `sys.exit(0)`); else
    how its run failed: abandoned on SIGTERM or Ctrl-C, crashed on anything else (with
    `sys.exit`'s code)."""
    if exc is None or (
        isinstance(exc, SystemExit) and not isinstance(exc, Terminated) and exc.code in (0, None)
    ):
        return None
    if isinstance(exc, Terminated):
        return Ending(FailReason.ABANDONED, exc.failure_class, exc.message, exc.cause)
    if isinstance(exc, KeyboardInterrupt):
        return Ending(FailReason.ABANDONED, message="interrupted")
    exit_code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else None
    return Ending(FailReason.CRASH, exit_code=exit_code)


def open_crash_log(run_dir: Path, run_id: str) -> IO[str] | None:
    """Have a segfault or abort leave a native-level traceback of every thread in
    run_dir/crash.log: the file it goes to, or None (said once) if it cannot be made."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with trust.open_folder(run_dir, create=True) as folder:
            fd = trust.create_file(folder, CRASH_LOG, exclusive=False, append=True)
        crash_log = open(fd, "a")  # noqa: SIM115
    except OSError as exc:
        log.warning("no crash.log for run %s: %s", run_id, exc)
        return None
    faulthandler.enable(crash_log, all_threads=True)
    return crash_log


def close_crash_log(crash_log: IO[str], run_dir: Path) -> None:
    """Stop writing native tracebacks; a crash.log left empty (no crash) is removed."""
    faulthandler.disable()
    empty = crash_log.tell() == 0
    crash_log.close()
    if empty:
        (run_dir / CRASH_LOG).unlink(missing_ok=True)
