"""The processes of the commands runnerctl launches: each in its own process group, which
dies with runnerctl and is signalled as one (SIGINT/SIGTERM passed on, --timeout, a sweep's
fail_fast), its output teed to the terminal and to the run's logs, its memory confined to a
cgroup of its own for --memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from runnerd_client.procinfo import cgroup_dir
from runnerd_client.trust import UntrustedPath, create_file, open_folder

KILL_AFTER = 5.0
TAIL = 64 * 1024
LOGS = ("stdout.log", "stderr.log")


@dataclass(frozen=True)
class Stop:
    """Why runnerctl stopped a command: recorded as the run's failed_abandoned failure."""

    failure_class: str
    message: str
    signum: int = signal.SIGTERM
    cause: str | None = None

    @classmethod
    def received(cls, signum: int) -> Stop:
        """runnerctl itself got SIGINT or SIGTERM, and passed it on."""
        return cls(
            "KeyboardInterrupt" if signum == signal.SIGINT else "Terminated",
            f"runnerctl received {signal.Signals(signum).name}",
            signum,
        )


class Launcher:
    """The process groups of the commands running now, so that a signal to runnerctl or a
    sweep's fail_fast stops every one of them, and each run records why."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen[bytes]] = {}
        self._stops: dict[int, Stop] = {}
        self.stopping: Stop | None = None

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a command in its own process group, unless everything is being stopped
        (several threads may start commands at once: the lock is not held meanwhile)."""
        if self.stopping is not None:
            raise Stopped(self.stopping)
        proc = subprocess.Popen(
            command, start_new_session=True, preexec_fn=_die_with_parent, **kwargs
        )
        with self._lock:
            self._running[proc.pid] = proc
            stop = self.stopping
            if stop is not None:
                self._stops.setdefault(proc.pid, stop)
        if stop is not None:  # everything was stopped while it started
            _killpg(proc.pid, stop.signum)
        return proc

    def done(self, proc: subprocess.Popen[bytes]) -> Stop | None:
        """Forget a finished command; why it was stopped, if it was."""
        with self._lock:
            self._running.pop(proc.pid, None)
            return self._stops.pop(proc.pid, None)

    def stop_all(self, stop: Stop, grace: float | None = KILL_AFTER) -> None:
        """Send `stop.signum` to every running group and start no more; with `grace`,
        SIGKILL whatever is still running after it."""
        with self._lock:
            self.stopping = self.stopping or stop
            running = dict(self._running)
            for pid in running:
                self._stops.setdefault(pid, stop)
        for pid in running:
            _killpg(pid, stop.signum)
        if grace is not None and running:
            timer = threading.Timer(grace, self._kill_left, args=(list(running),))
            timer.daemon = True
            timer.start()

    def _kill_left(self, pids: list[int]) -> None:
        with self._lock:
            left = [pid for pid in pids if pid in self._running]
        for pid in left:
            _killpg(pid, signal.SIGKILL)


class Stopped(Exception):
    """Raised instead of starting a command once everything is being stopped."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.message)
        self.stop = stop


def _killpg(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: be SIGKILLed if runnerctl dies, so no command outlives its record."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Tee(threading.Thread):
    """Copy a child's output to a log file, and to the terminal if given, as it comes."""

    def __init__(
        self, source: IO[bytes], terminal: IO[bytes] | None, log: IO[bytes], log_path: Path
    ) -> None:
        super().__init__(daemon=True)
        self.source, self.terminal, self.log, self.log_path = source, terminal, log, log_path
        self.tail = b""
        self.size = 0

    def run(self) -> None:
        while chunk := os.read(self.source.fileno(), 1 << 16):
            self.log.write(chunk)
            self.log.flush()  # on disk as it comes: the daemon reads output as progress
            self.size += len(chunk)
            if self.terminal is not None:
                self.terminal.write(chunk)
                self.terminal.flush()
            self.tail = (self.tail + chunk)[-TAIL:]
        self.log.flush()


def open_logs(run_dir: Path) -> tuple[IO[bytes], IO[bytes]]:
    """stdout.log and stderr.log in the run's folder, emptied. Opened O_NOFOLLOW in the
    folder opened once: a symlink planted at either name is refused, never written
    through, and so is a folder anyone may write to (UntrustedPath, an OSError)."""
    files: list[IO[bytes]] = []
    try:
        with open_folder(run_dir, create=True) as dir_fd:
            for name in LOGS:
                try:
                    fd = create_file(dir_fd, name, exclusive=False, append=True)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise UntrustedPath(run_dir / name, "it is a symlink") from None
                    raise
                files.append(os.fdopen(fd, "ab"))
                os.ftruncate(fd, 0)  # only once it is known to be a file of ours
    except BaseException:
        for fh in files:
            fh.close()
        raise
    return files[0], files[1]


class CgroupError(Exception):
    """A memory cgroup for --memory cannot be made here; the message says why."""


@contextmanager
def memory_cgroup(name: str, limit: int | None) -> Iterator[Path | None]:
    """A memory cgroup of the run's own under ours, limited to `limit` bytes, removed after."""
    if limit is None:
        yield None
        return
    own = cgroup_dir("self")
    if own is None:
        raise CgroupError("no memory cgroup controller is mounted here")
    folder = own / name
    try:
        folder.mkdir()
        knob = "memory.max" if (folder / "memory.max").exists() else "memory.limit_in_bytes"
        (folder / knob).write_text(str(limit))
        if (folder / "memory.swappiness").exists():
            (folder / "memory.swappiness").write_text("0")  # over the limit: OOM, not swap
    except OSError as exc:
        raise CgroupError(f"cannot create a memory cgroup under {own}: {exc.strerror}") from exc
    try:
        yield folder
    finally:
        for _ in range(50):
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.02)  # its last process is still being reaped


@contextmanager
def on_signals(handle: Callable[[int], None]) -> Iterator[None]:
    """Call `handle(signum)` on SIGINT and SIGTERM while inside (main thread only)."""
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: handle(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forwarding(launcher: Launcher) -> AbstractContextManager[None]:
    """Pass SIGINT and SIGTERM on to the commands' process groups."""
    return on_signals(lambda signum: launcher.stop_all(Stop.received(signum), grace=None))


def wait(proc: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Wait for the command; past `timeout` send TERM, then KILL. True if it timed out."""
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGTERM, KILL_AFTER), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    return True
