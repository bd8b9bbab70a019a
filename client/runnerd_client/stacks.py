"""Every thread's Python stack on request, for `runnerctl stack` where py-spy may not attach.

`install(run_dir)` (done by `rd.run`) has `faulthandler` dump all threads to
`run_dir/stack-PID.txt` when the process gets STACK_SIGNAL, a real-time signal no library
uses. The dump is written by the interpreter's C signal handler, so it works while every
Python thread is stuck, and it never stops or changes the process. runnerctl finds the
file through the process's open descriptors and only signals a process whose signal mask
shows the handler (a process without one would die of the signal).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
from pathlib import Path
from typing import IO

from runnerd_client import trust

log = logging.getLogger("runnerd_client")
STACK_SIGNAL = signal.SIGRTMIN + 6
STACK_FILE = "stack-{pid}.txt"

_current: IO[str] | None = None


def install(run_dir: Path) -> None:
    """Dump every thread's stack to run_dir/stack-PID.txt on STACK_SIGNAL (the latest run
    entered in this process gets the dumps); never raises."""
    global _current
    name = STACK_FILE.format(pid=os.getpid())
    try:
        with trust.open_folder(run_dir, create=True) as folder:
            fd = trust.create_file(folder, name, exclusive=False, append=True)
        out = open(fd, "a")  # noqa: SIM115 - held open: the handler writes to its descriptor
        faulthandler.register(STACK_SIGNAL, file=out, all_threads=True, chain=False)
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("no stack dumps on request for %s: %s", run_dir, exc)
        return
    previous, _current = _current, out
    if previous is not None:
        previous.close()
