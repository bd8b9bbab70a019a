"""Fixtures that run the real daemon: a subprocess on a short temp socket and a temp registry."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runnerd_client.protocol import HEADER, frame, unpack_body

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> T:
    """Poll until `condition()` is truthy; fail the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    """A runnerd process and the environment its clients and runnerctl need."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
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
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RUNNERD_SOCKET=str(self.socket), RUNNERD_DB=str(self.db),
                   XDG_DATA_HOME=str(self.root / "data"),
                   XDG_CONFIG_HOME=str(self.root / "config"),
                   XDG_STATE_HOME=str(self.root / "state"), PYTHONUNBUFFERED="1")
        env.pop("RUNNERD_RUN_ID", None)
        return env

    def start(self) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runnerd", "--log-level", "debug", *self.extra_args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._accepting, what=f"runnerd to listen (log: {self.log.read_text()[-2000:]})")
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"runnerd exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(self.socket))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def as_if_rebooted(self) -> None:
        """With the daemon down: make the registry's processes look started before a reboot
        (the machine went down under them, rather than they died on their own)."""
        with closing(sqlite3.connect(self.db)) as db, db:
            db.execute("UPDATE run_pids SET boot_id = 'an-earlier-boot'")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run runnerctl against this daemon."""
        result = subprocess.run([sys.executable, "-m", "runnerd.cli", *args], env=self.env,
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            pytest.fail(f"runnerctl {' '.join(args)} exited {result.returncode}: "
                        f"{result.stderr}")
        return result

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def run_if_known(self, run_id: str) -> Any:
        """The run as `show --json` gives it, or None while the daemon has not heard of it
        (its events may still be in a spool the daemon has yet to replay)."""
        result = self.ctl("show", run_id, "--json", check=False)
        if result.returncode == 4 and "no run matches" in result.stderr:
            return None
        if result.returncode != 0:
            pytest.fail(f"runnerctl show {run_id} exited {result.returncode}: {result.stderr}")
        return json.loads(result.stdout)

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a client process running `code` (from a script file, as a user would)."""
        script = self.root / f"script_{hashlib.sha1(code.encode()).hexdigest()[:12]}.py"
        if not script.exists():
            script.with_suffix(".tmp").write_text(code)
            script.with_suffix(".tmp").rename(script)
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.Popen([sys.executable, str(script), *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)

    def run_state(self, run_id: str) -> str:
        return str(self.ctl_json("show", run_id)["state"])


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp folder with a short path: unix socket paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One daemon for a whole module whose cases do not disturb each other."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as name:
        daemon = Daemon(Path(name)).start()
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Client processes a test starts; killed and reaped when it ends."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    d = Daemon(short_tmp).start()
    try:
        yield d
    finally:
        d.stop()


class RawClient:
    """A bare socket speaking frames by hand, for tests of what the daemon does with bad input."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

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

    def hello(self) -> dict[str, Any]:
        return self.call({"op": "hello", "v": 1, "id": 0, "client": "tests"})

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


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(daemon.socket)
    client.hello()
    yield client
    client.close()
