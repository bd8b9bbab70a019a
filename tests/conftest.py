"""Fixtures that run the real daemon: a subprocess on a short temp socket and a temp registry."""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest

from runnerd import testing
from runnerd.testing import RawClient
from runnerd_client.cells import sorted_variation
from runnerd_client.ids import new_key, new_run_id

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """Poll until `condition()` is truthy; fail the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Daemon(testing.Daemon):
    """A runnerd process (runnerd.testing's, shared with bench/) that fails the test when it
    does not start, with what its clients and runnerctl need."""

    def start(self, timeout: float = 10.0) -> Self:
        try:
            return super().start(timeout)
        except testing.StartError as exc:
            pytest.fail(str(exc))

    def as_if_rebooted(self) -> None:
        """With the daemon down: make the registry's processes look started before a reboot
        (the machine went down under them, rather than they died on their own)."""
        with closing(sqlite3.connect(self.db)) as db, db:
            db.execute("UPDATE run_pids SET boot_id = 'an-earlier-boot'")

    def as_named_before(self) -> None:
        """With the daemon down: name the sweeps' cells and their runs as runnerd recorded
        them before names followed the params' order, keys sorted (`lr=0.1,x=3`)."""
        with closing(sqlite3.connect(self.db)) as db, db:
            db.create_function("sorted_name", 1, lambda p: sorted_variation(json.loads(p)))
            db.execute("UPDATE sweep_cells SET variation = sorted_name(params)")
            db.execute("UPDATE runs SET variation = sorted_name(params) WHERE sweep_id IS NOT NULL")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run runnerctl against this daemon."""
        result = self.runnerctl(*args)
        if check and result.returncode != 0:
            pytest.fail(f"runnerctl {' '.join(args)} exited {result.returncode}: {result.stderr}")
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
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **kwargs,
        )

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


class Wire:
    """Greeted raw connections to one daemon, all closed at the end: requests on the first
    (`client`), each reply checked to answer its id, and the check that the daemon still
    serves everyone."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.opened: list[RawClient] = []

    @functools.cached_property
    def client(self) -> RawClient:
        return self.connect()

    def connect(self, hello: bool = True) -> RawClient:
        client = RawClient(self.daemon.socket)
        self.opened.append(client)
        if hello:
            assert client.hello()["ok"] is True
        return client

    def call(self, op: str, /, **fields: Any) -> dict[str, Any]:
        return self.client.request(op, **fields)

    def ok(self, op: str, /, **fields: Any) -> dict[str, Any]:
        reply = self.call(op, **fields)
        assert reply["ok"] is True, reply
        return reply

    def assert_serving(self, *others: RawClient) -> None:
        """The daemon is up, still serves its clients, and serves a new one end to end."""
        try:
            for other in others:
                assert other.request("status")["ok"] is True
            self._full_run()
        except OSError as exc:
            proc = self.daemon.proc
            pytest.fail(
                f"runnerd stopped serving ({exc!r}; exit code "
                f"{proc.poll() if proc else None}): {self.daemon.log.read_text()[-3000:]}"
            )
        assert self.daemon.ctl("status").returncode == 0

    def _full_run(self) -> None:
        client = self.connect()
        run_id = new_run_id()
        created = client.request(
            "create", key=new_key(), run_id=run_id, experiment="healthy", params={"lr": 0.1}
        )
        assert created["ok"] is True, created
        assert client.request("start", key=new_key(), run_id=run_id)["state"] == "running"
        assert client.request("succeed", key=new_key(), run_id=run_id)["state"] == "succeeded"
        run = client.request("get", run=run_id)["run"]
        assert (run["state"], run["params"]) == ("succeeded", {"lr": 0.1})
        client.close()

    def close(self) -> None:
        for client in self.opened:
            client.close()


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(daemon.socket)
    client.hello()
    yield client
    client.close()
