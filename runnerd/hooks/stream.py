"""A hook kept running (`mode = "stream"`): one process per hook, given one event per line
on its stdin and answering one acknowledgement line per event on its stdout, so a tool's
import is paid once per process instead of once per event.

Used from worker threads, one event at a time (the runner gives a stream hook one turn at
a time). The process runs in a session of its own. When it exits, outlives the timeout of
an event or answers anything but an acknowledgement, its session is killed and the next
event starts a new process. When the daemon stops, its stdin is closed, and it is killed
if it does not exit within a moment. A thread drains its stderr and keeps the tail, the error of a
failed event (as a call keeps its command's).
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import threading
import time
from typing import IO, Any

from runnerd.config import Hook
from runnerd.hooks.call import EXCERPT, Outcome, described, exited, kill_session

log = logging.getLogger(__name__)

ACK = '{"ok": true} or {"ok": false, "error": "..."}'
MAX_LINE = 1 << 20  # bytes: a longer answer is not an acknowledgement
DRAIN_WAIT = 0.5  # seconds to read the rest of a killed process's stderr
EXIT_WAIT = 1.0  # seconds a process that closed its stdout gets to exit, for its status


class Broken(Exception):
    """The process cannot go on (exited, timed out, answered wrongly): it is killed and
    the event counts as failed."""


class Tail:
    """The last bytes a process wrote to its stderr, and how many it wrote in all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data = b""
        self.total = 0

    def drain(self, stream: IO[bytes]) -> None:
        """Read until EOF (a thread's whole life), keeping the end."""
        with stream:
            while chunk := os.read(stream.fileno(), 1 << 16):
                with self.lock:
                    self.data = (self.data + chunk)[-4 * EXCERPT :]
                    self.total += len(chunk)

    def since(self, mark: int) -> str | None:
        """What was written after `total` was `mark` (as much of it as is kept)."""
        with self.lock:
            data = self.data[len(self.data) - min(len(self.data), self.total - mark) :]
        return data.decode(errors="replace").strip()[-EXCERPT:] or None


class Process:
    """One started process of a stream hook, with its unread stdout."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert self.popen.stdin and self.popen.stdout and self.popen.stderr
        self.stdin, self.stdout = self.popen.stdin.fileno(), self.popen.stdout.fileno()
        os.set_blocking(self.stdin, False)
        self.pidfd = _pidfd(self.popen.pid)  # readable once it exits, whoever holds its pipes
        self.unread = b""
        self.reaped = False
        self.stderr = Tail()
        self.drainer = threading.Thread(
            target=self.stderr.drain, args=(self.popen.stderr,), daemon=True, name="hook-stderr"
        )
        self.drainer.start()

    def running(self) -> bool:
        """Not exited (a process that exited stays unreaped, so its session can be killed)."""
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            return not self.reaped and os.waitid(os.P_PID, self.popen.pid, flags) is None
        except ChildProcessError:
            return False

    def send(self, line: bytes, deadline: float) -> None:
        view = memoryview(line)
        while view:
            self._wait(self.stdin, select.POLLOUT, deadline)
            try:
                view = view[os.write(self.stdin, view) :]
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE: it exited or closed its stdin
                raise EOFError from exc

    def receive(self, deadline: float) -> bytes:
        """The next line it writes (EOFError if it closes its stdout, TimeoutError)."""
        while b"\n" not in self.unread:
            if len(self.unread) > MAX_LINE:
                raise Broken(f"answered more than {MAX_LINE} bytes without a newline; killed")
            self._wait(self.stdout, select.POLLIN, deadline)
            chunk = os.read(self.stdout, 1 << 16)
            if not chunk:
                raise EOFError
            self.unread += chunk
        line, _, self.unread = self.unread.partition(b"\n")
        return line

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        """Until `fd` is ready for `event` (or hung up); EOFError if the process exits first
        (a child it started may hold its stdout open), TimeoutError at `deadline`."""
        poller = select.poll()
        poller.register(fd, event)
        if self.pidfd is not None:
            poller.register(self.pidfd, select.POLLIN)
        ready = dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
        if not ready:
            raise TimeoutError
        if fd not in ready:
            raise EOFError

    def end(self, lock: threading.Lock) -> int:
        """Kill its session (everything it started too) and reap it; its exit status. The
        lock is held until it is reaped, so no one kills its pid once it may be reused."""
        with lock:
            if not self.reaped:
                kill_session(self.popen.pid)
            code = self.popen.wait()
            self.reaped = True
        self.drainer.join(DRAIN_WAIT)  # what it wrote last, for the error
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                pipe.close()
        return code


def stream_of(hook: Hook, socket: str) -> HookStream:
    """A stream hook's process-to-be. Its environment has what does not change from one
    event to the next (the rest is in each event's line)."""
    extra = {"RUNNERD_HOOK": hook.name, "RUNNERD_SOCKET": socket, "RUNNERD_HOOK_MODE": "stream"}
    return HookStream(hook.name, hook.command, {**os.environ, **extra}, hook.timeout)


class HookStream:
    """A stream hook's command and its current process: `deliver` an event from a worker
    thread, `kill` the process from anywhere, `close` it when the daemon stops."""

    def __init__(
        self, name: str, command: tuple[str, ...] | str, env: dict[str, str], timeout: float
    ) -> None:
        self.name, self.env, self.timeout = name, env, timeout
        self.argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        self.lock = threading.Lock()
        self.process: Process | None = None
        self.stopped = False
        self.busy = False  # an event is being delivered (in a worker thread)

    def start(self) -> Process:
        """The running process; a new one if there is none or it exited."""
        with self.lock:
            if self.stopped:
                raise Broken("not sent: the daemon is stopping")
            current = self.process
        if current is not None and not current.running():
            error = current.stderr.since(0)
            code = current.end(self.lock)
            log.warning(
                "hook %s: its process %d %s between events%s; starting a new one",
                self.name,
                current.popen.pid,
                described(code),
                f": {error}" if error else "",
            )
            current = None
        if current is None:
            try:
                current = Process(self.argv, self.env)
            except (OSError, ValueError) as exc:
                raise Broken(f"cannot start {self.argv[0]}: {exc}") from exc
            with self.lock:
                self.process, stopped = current, self.stopped
            if stopped:  # the daemon began to stop while it started
                current.end(self.lock)
                raise Broken("not sent: the daemon is stopping")
        return current

    def warm(self) -> None:
        """Start the process before the first event (its imports done ahead of time)."""
        try:
            self.start()
        except Broken as exc:
            log.warning("hook %s: %s", self.name, exc)

    def deliver(self, body: Any, seq: int) -> Outcome:
        """Send one event and wait for its acknowledgement, at most `timeout`."""
        with self.lock:
            self.busy = True
        try:
            return self._deliver(body, seq)
        finally:
            with self.lock:
                self.busy = False

    def _deliver(self, body: Any, seq: int) -> Outcome:
        started = time.monotonic()
        deadline = started + self.timeout
        process, mark = None, 0
        try:
            process = self.start()
            mark = process.stderr.total
            process.send(json.dumps(body).encode() + b"\n", deadline)
            ok, error = _acknowledged(process.receive(deadline), seq)
            if process.unread:
                raise Broken(f"answered more than one line for event {seq}; killed")
        except (Broken, EOFError, TimeoutError) as exc:
            code = self._fail(process, exc, deadline) if process is not None else None
            error = self._error(exc, code, process, mark)
            return Outcome(False, code, error, time.monotonic() - started)
        if not ok and error is None:
            error = process.stderr.since(mark) or "not acknowledged (no error given)"
        return Outcome(ok, None, error, time.monotonic() - started)

    def _fail(self, process: Process, exc: Exception, deadline: float) -> int:
        """End a process that cannot go on; one that closed its stdout first gets a moment
        to exit by itself, so its own status is the one reported."""
        if isinstance(exc, EOFError):
            exited(process.popen, max(0.0, min(EXIT_WAIT, deadline - time.monotonic())))
        code = process.end(self.lock)
        with self.lock:
            if self.process is process:
                self.process = None
        return code

    def _error(self, exc: Exception, code: int | None, process: Process | None, mark: int) -> str:
        if isinstance(exc, TimeoutError):
            return f"timed out after {self.timeout:g} s; killed"
        stderr = process.stderr.since(mark) if process is not None else None
        if isinstance(exc, EOFError):
            how = "killed" if self.stopped else described(code or 0)
            return f"{how} before acknowledging" + (f": {stderr}" if stderr else "")
        return str(exc) + (f"; stderr: {stderr}" if stderr else "")

    def kill(self) -> None:
        """SIGKILL the current process's session (a call cancelled mid-event)."""
        with self.lock:
            process = self.process
            if process is not None and not process.reaped:
                kill_session(process.popen.pid)

    def stop(self) -> Process | None:
        """No more events; close the stdin of a process waiting for one (its end of the
        stream) and return it, or kill one in the middle of an event (its worker thread
        ends it)."""
        with self.lock:
            self.stopped = True
            process, busy = self.process, self.busy
        if process is None or busy:
            self.kill()
            return None
        if process.popen.stdin is not None:
            process.popen.stdin.close()
        return process


def close_all(streams: list[HookStream], grace: float) -> None:
    """The daemon is stopping: every stream hook's stdin closed, then each process given
    until `grace` seconds from now to exit, then killed."""
    deadline = time.monotonic() + grace
    ending = [(stream, stream.stop()) for stream in streams]
    for stream, process in ending:
        if process is not None:
            exited(process.popen, max(0.0, deadline - time.monotonic()))
            process.end(stream.lock)


def _acknowledged(line: bytes, seq: int) -> tuple[bool, str | None]:
    """(ok, error) of an acknowledgement of event `seq`; Broken if it is not one."""
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if (
        not isinstance(doc, dict)
        or type(doc.get("ok")) is not bool
        or ("seq" in doc and doc["seq"] != seq)
    ):
        text = line[:200].decode(errors="replace")
        raise Broken(f"answered {text!r}, not an acknowledgement of event {seq} ({ACK}); killed")
    error = doc.get("error")
    return doc["ok"], (str(error)[-EXCERPT:] or None) if error is not None else None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # an old kernel: its stdout's EOF tells instead
        return None
