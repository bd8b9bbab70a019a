"""One call of a hook's command, made in a worker thread (never on the event loop).

The payload goes in through an unlinked temporary file, so a command that never reads its
stdin cannot block the call, and its stderr goes to another, so a chatty command cannot
fill a pipe or the daemon's memory: only the tail is kept, for the log and `runnerctl
hooks`. The command runs in a session of its own, so a timeout (or the daemon stopping)
kills everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

EXCERPT = 600  # characters of a failed call's stderr kept


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended: `ok` (exit 0) or not, with the exit status and an error excerpt."""

    ok: bool
    exit: int | None
    error: str | None
    seconds: float


class HookCall:
    """A command with its stdin payload, environment and timeout; `run` in a thread,
    `kill` from anywhere (the daemon stopping)."""

    def __init__(
        self, command: tuple[str, ...] | str, payload: Any, env: dict[str, str], timeout: float
    ) -> None:
        self.argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        self.payload, self.env, self.timeout = payload, env, timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._reaped = False

    def run(self) -> Outcome:
        """Encode the payload (JSON), run the command with it and `env` added to the
        daemon's environment, and say how it ended."""
        started = time.monotonic()
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stderr:
            stdin.write(json.dumps(self.payload).encode())
            stdin.seek(0)
            exit_code, error = self._run(stdin, stderr, {**os.environ, **self.env})
            if exit_code is not None and exit_code != 0 and error is None:
                error = _excerpt(stderr) or described(exit_code)
        return Outcome(exit_code == 0, exit_code, error, time.monotonic() - started)

    def _run(
        self, stdin: IO[bytes], stderr: IO[bytes], env: dict[str, str]
    ) -> tuple[int | None, str | None]:
        with self._lock:
            if self._stopped:
                return None, "not run: the daemon is stopping"
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    env=env,
                    start_new_session=True,
                )
            except (OSError, ValueError) as exc:
                return None, f"cannot start {self.argv[0]}: {exc}"
        if not exited(self._proc, self.timeout):
            self.kill()
            self._reap()
            return None, f"timed out after {self.timeout:g} s; killed"
        code = self._reap()
        return code, "killed: the daemon is stopping" if self._stopped else None

    def _reap(self) -> int:
        assert self._proc is not None
        with self._lock:
            code = self._proc.wait()
            self._reaped = True
        return code

    def kill(self) -> None:
        """SIGKILL the command's session (not once it is reaped: its pid may be reused)."""
        with self._lock:
            self._stopped = True
            if self._proc is not None and not self._reaped:
                kill_session(self._proc.pid)


def kill_session(pid: int) -> None:
    """SIGKILL the session a hook's process leads (everything it started too); the caller
    holds it unreaped, so the pid is still its own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for `proc` to exit (leaving it to be reaped); False at the timeout. A pidfd
    wakes at once; without one, Popen.wait polls."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


def _excerpt(stderr: IO[bytes]) -> str | None:
    """The end of what the command wrote to stderr (its last lines, at most EXCERPT)."""
    size = stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, size - 4 * EXCERPT))
    text = stderr.read().decode(errors="replace").strip()
    return text[-EXCERPT:] or None


def described(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"
