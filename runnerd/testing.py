"""A throwaway runnerd for tests and benchmarks, and a socket that speaks frames by hand.

`Daemon(folder).start()` runs the real daemon as a subprocess with its socket, registry,
config and run folders all under `folder`, and returns once it accepts connections; its
`env` points clients and runnerctl at it. runnerd's own tests and bench scripts share it
(it is importable from both without path changes); so can the tests of code that reports
to runnerd. Keep `folder` short: a unix socket path has at most 107 bytes.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from runnerd_client.protocol import HEADER, frame, unpack_body


class StartError(RuntimeError):
    """The daemon exited, or did not accept connections in time (the message has its log)."""


@dataclass
class Daemon:
    """A runnerd process and the environment its clients and runnerctl need."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
    log_level: str = "debug"
    profile: str | None = None  # cProfile the daemon's event-loop thread into this file
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "run" / "runnerd.sock"

    @property
    def db(self) -> Path:
        return self.root / "state" / "registry.sqlite3"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def config(self) -> Path:
        """Where the daemon reads its config.toml when it starts."""
        return self.root / "config" / "runnerd" / "config.toml"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RUNNERD_SOCKET=str(self.socket),
            RUNNERD_DB=str(self.db),
            XDG_DATA_HOME=str(self.root / "data"),
            XDG_CONFIG_HOME=str(self.root / "config"),
            XDG_STATE_HOME=str(self.root / "state"),
            PYTHONUNBUFFERED="1",
        )
        env.pop("RUNNERD_RUN_ID", None)
        return env

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was never started"
        return self.proc.pid

    def command(self) -> list[str]:
        profile = ["-m", "cProfile", "-o", self.profile] if self.profile else []
        return [
            sys.executable,
            *profile,
            "-m",
            "runnerd",
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> Self:
        """Launch the daemon; return once it accepts connections."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.accepting():
            if self.proc.poll() is not None:
                raise StartError(f"runnerd exited {self.proc.returncode}: {self.log_tail(3000)}")
            if time.monotonic() > deadline:
                raise StartError(
                    f"timed out after {timeout} s waiting for runnerd to listen "
                    f"(log: {self.log_tail(2000)})"
                )
            time.sleep(0.005)
        return self

    def accepting(self) -> bool:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(self.socket))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` (SIGKILL after `timeout` if it is still there); its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def runnerctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run runnerctl against this daemon."""
        return subprocess.run(
            [sys.executable, "-m", "runnerd.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log_tail(self, size: int) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""


class RawClient:
    """A bare socket speaking frames by hand, for what the daemon does with bad input."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._ids = itertools.count(1000)  # clear of the small ids of hand-made frames
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(frame(msg))

    def recv(self) -> dict[str, Any]:
        """The next reply; raises ConnectionError if the daemon closed the connection."""
        (length,) = HEADER.unpack(self._exactly(HEADER.size))
        reply: dict[str, Any] = unpack_body(self._exactly(length))
        return reply

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send(msg)
        return self.recv()

    def request(self, op: str, /, **fields: Any) -> dict[str, Any]:
        """Send `op` with `fields` and a fresh id; its reply, which must answer that id."""
        req_id = next(self._ids)
        reply = self.call({"op": op, "id": req_id, **fields})
        if reply.get("id") != req_id:
            raise AssertionError(f"the reply to {op} (id {req_id}) is {reply!r}")
        return reply

    def hello(self, client: str = "tests") -> dict[str, Any]:
        return self.call({"op": "hello", "v": 1, "id": 0, "client": client})

    def closed_by_peer(self) -> bool:
        """True once the daemon has closed its end (EOF on read)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed by the daemon")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()
