"""The registry and the daemon's own writes under storage faults, and artifact hashing that
cannot tie the daemon up.

A daemon-side change (a death judged, a deadline passed) that fails on a full disk lands
once space is back, with no client to retry it; reads go on while a write waits for a lock
another process holds; a registry that is locked, damaged or empty at start-up is refused
with a message that names the file and what to do; artifacts that are not plain files, or
that cannot be hashed, are refused at once and leave every other request served.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_storage_faults import HOLD_LOCK, create, fill, tmpfs

from conftest import Daemon, RawClient, wait_for
from runnerd.registry import Registry
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id

_ids = itertools.count(1)


def call(client: RawClient, op: str, /, **fields: Any) -> dict[str, Any]:
    req_id = next(_ids)
    reply = client.call({"op": op, "id": req_id, **fields})
    assert reply["id"] == req_id, reply
    return reply


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


def write_config(daemon: Daemon, text: str) -> None:
    config = daemon.root / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)


def refused_start(daemon: Daemon) -> str:
    """Start runnerd, expecting it to refuse; what it said."""
    result = subprocess.run(
        [sys.executable, "-m", "runnerd"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert not daemon.socket.exists()
    return result.stderr


# --- a daemon-side change that fails on a full disk is retried until it lands ---------


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the registry."""
    with tmpfs(short_tmp / "state") as mount:
        yield mount


ATTACHED = textwrap.dedent("""
    import sys
    from runnerd_client.connection import Connection
    from runnerd_client.ids import new_key, new_run_id
    from runnerd_client.protocol import Create, Start
    conn = Connection()
    run_id = new_run_id()
    conn.call(Create(key=new_key(), run_id=run_id, experiment="disk-full"))
    conn.call(Start(key=new_key(), run_id=run_id, heartbeat_timeout=3600.0,
                    deadline=float(sys.argv[1])))
    print(run_id, flush=True)
    sys.stdin.readline()
""")


def test_a_death_and_a_deadline_on_a_full_disk_land_once_space_is_freed(
    short_tmp: Path, small_disk: Path, procs: list[subprocess.Popen[str]]
) -> None:
    daemon = Daemon(short_tmp).start()
    try:
        victim = daemon.python(ATTACHED, "3600", stdin=subprocess.PIPE)
        procs.append(victim)
        assert victim.stdout is not None
        killed = victim.stdout.readline().strip()
        timed = daemon.python(ATTACHED, "3", stdin=subprocess.PIPE)
        procs.append(timed)
        assert timed.stdout is not None
        overdue = timed.stdout.readline().strip()
        filler = fill(small_disk, leave=0)
        victim.kill()
        wait_for(
            lambda: f"marking run {killed} crashed failed" in daemon.log.read_text(),
            timeout=30,
            what="the death judgement to fail on the full disk",
        )
        wait_for(
            lambda: f"watchdog check of {overdue} failed" in daemon.log.read_text(),
            timeout=30,
            what="the deadline check to fail on the full disk",
        )
        assert daemon.run_state(killed) == "running"
        filler.unlink()
        wait_for(
            lambda: daemon.run_state(killed) == "failed_crash",
            timeout=30,
            what="the death judgement to land",
        )
        failure = daemon.ctl_json("show", killed)["failure"]
        assert failure["failure_class"] == "ProcessExited", failure
        wait_for(
            lambda: daemon.run_state(overdue) == "failed_timeout",
            timeout=30,
            what="the deadline to land",
        )
    finally:
        daemon.stop()


# --- artifacts ---------------------------------------------------------------------


def test_artifacts_of_proc_files_are_refused_at_once_and_others_served(
    daemon: Daemon, short_tmp: Path
) -> None:
    conn = Connection(daemon.socket)
    run_id = create(conn)
    flood = RawClient(daemon.socket)
    flood.hello()
    first = 10_000
    for i in range(40):
        flood.send(
            {
                "op": "artifact",
                "id": first + i,
                "key": new_key(),
                "run_id": run_id,
                "path": "/proc/self/pagemap",
            }
        )
    normal = short_tmp / "model.bin"
    normal.write_bytes(b"weights" * 1000)
    other = RawClient(daemon.socket)
    other.hello()
    reply = call(other, "artifact", key=new_key(), run_id=run_id, path=str(normal))
    assert reply["ok"] is True, reply
    assert reply["sha256"] == hashlib.sha256(normal.read_bytes()).hexdigest()
    refusals = [flood.recv() for _ in range(40)]
    assert sorted(r["id"] for r in refusals) == list(range(first, first + 40))
    for refused in refusals:
        code, message = error_of(refused)
        assert code == "bad_request" and "/proc/self/pagemap" in message, refused
        assert "proc" in message.split("/proc/self/pagemap", 1)[1], message
    flood.close()
    other.close()
    conn.close()


def _sys_file() -> str:
    for path in ("/sys/devices/system/cpu/online", "/sys/kernel/mm/transparent_hugepage/enabled"):
        if os.path.isfile(path):
            return path
    pytest.skip("no readable file under /sys here")


@pytest.mark.parametrize("path", ["/proc/self/status", "/proc/self/environ", "sys", "/dev/zero"])
def test_special_files_are_refused_as_artifacts(raw: RawClient, path: str) -> None:
    path = _sys_file() if path == "sys" else path
    run_id = new_run_id()
    assert call(raw, "create", key=new_key(), run_id=run_id, experiment="special")["ok"]
    code, message = error_of(call(raw, "artifact", key=new_key(), run_id=run_id, path=path))
    assert code == "bad_request" and path in message
    assert call(raw, "get", run=run_id)["run"]["artifacts"] == []


GROWER = textwrap.dedent("""
    import sys
    with open(sys.argv[1], "ab", buffering=0) as fh:
        print("growing", flush=True)
        while True:
            fh.write(b"x" * 65536)
""")


def test_a_file_that_grows_while_hashed_is_refused(
    daemon: Daemon, raw: RawClient, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    log_file = short_tmp / "growing.log"
    with open(log_file, "wb") as fh:
        fh.truncate(256 << 20)
    grower = daemon.python(GROWER, str(log_file))
    procs.append(grower)
    assert grower.stdout is not None and grower.stdout.readline().strip() == "growing"
    run_id = new_run_id()
    assert call(raw, "create", key=new_key(), run_id=run_id, experiment="growing")["ok"]
    code, message = error_of(
        call(raw, "artifact", key=new_key(), run_id=run_id, path=str(log_file))
    )
    assert code == "bad_request" and str(log_file) in message and "changed" in message
    grower.kill()


def test_a_hash_that_takes_too_long_is_a_clear_error_and_blocks_no_one(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    write_config(daemon, "artifact_timeout = 1.0\n")
    daemon.start()
    try:
        huge = short_tmp / "huge.bin"
        with open(huge, "wb") as fh:
            fh.truncate(1 << 40)  # sparse: a terabyte of zeros, read at memory speed
        slow, other = RawClient(daemon.socket), RawClient(daemon.socket)
        slow.hello()
        other.hello()
        run_id = new_run_id()
        assert call(other, "create", key=new_key(), run_id=run_id, experiment="huge")["ok"]
        slow.send(
            {"op": "artifact", "id": 1, "key": new_key(), "run_id": run_id, "path": str(huge)}
        )
        normal = short_tmp / "small.bin"
        normal.write_bytes(b"small")
        assert call(other, "artifact", key=new_key(), run_id=run_id, path=str(normal))["ok"]
        assert daemon.ctl("status").returncode == 0
        code, message = error_of(slow.recv())
        assert code == "too_large" and str(huge) in message and "1 s" in message
        artifacts = call(other, "get", run=run_id)["run"]["artifacts"]
        assert [a["path"] for a in artifacts] == [str(normal)]
        slow.close()
        other.close()
    finally:
        daemon.stop()


# --- a lock held by another process ------------------------------------------------


def test_reads_answer_while_a_write_waits_for_a_lock(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    write_config(daemon, "busy_timeout = 30.0\n")
    daemon.start()
    locker: subprocess.Popen[str] | None = None
    try:
        conn = Connection(daemon.socket)
        before = create(conn)
        locker = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(daemon.db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        client = RawClient(daemon.socket)
        client.hello()
        waiting = new_run_id()
        client.send(
            {"op": "create", "id": 1, "key": new_key(), "run_id": waiting, "experiment": "locked"}
        )
        client.send({"op": "get", "id": 2, "run": before})
        answered = client.recv()
        assert answered["id"] == 2 and answered["run"]["run_id"] == before, answered
        assert before in daemon.ctl("list").stdout
        assert "pending" in daemon.ctl("status").stdout
        locker.communicate("\n", timeout=30)
        created = client.recv()
        assert created["id"] == 1 and created["ok"] is True, created
        client.close()
        conn.close()
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.communicate(timeout=30)
        daemon.stop()


def test_start_on_a_locked_registry_names_the_file(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    write_config(daemon, "busy_timeout = 0.5\n")
    daemon.start()
    daemon.stop()
    locker = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(daemon.db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        said = refused_start(daemon)
    finally:
        locker.communicate("\n", timeout=30)
    assert str(daemon.db) in said and "locked" in said
    assert "another process" in said and "fuser" in said, said


# --- a damaged or empty registry --------------------------------------------------


def test_a_corrupt_index_page_is_refused_at_start(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp).start()
    conn = Connection(daemon.socket)
    for _ in range(50):
        create(conn)
    conn.close()
    daemon.stop()
    with sqlite3.connect(daemon.db) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_schema WHERE name = ?", ("runs_by_created",)
        ).fetchone()
    db.close()
    assert not Path(f"{daemon.db}-wal").exists(), "the daemon left its WAL behind"
    with open(daemon.db, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\xa5" * 64)
    said = refused_start(daemon)
    assert str(daemon.db) in said and "damaged" in said
    assert "runnerctl backup" in said and ".recover" in said, said


def test_an_empty_registry_file_is_refused(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    daemon.db.parent.mkdir(parents=True)
    daemon.db.touch()
    said = refused_start(daemon)
    assert str(daemon.db) in said and "empty" in said, said
    assert daemon.db.stat().st_size == 0


def test_a_fresh_registry_is_private(daemon: Daemon) -> None:
    conn = Connection(daemon.socket)
    create(conn)
    conn.close()
    for path in (daemon.db, Path(f"{daemon.db}-wal"), Path(f"{daemon.db}-shm")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# --- reads on their own connection -----------------------------------------------


async def test_a_read_cancelled_before_its_turn_is_skipped(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite3")
    await registry.open()
    try:
        gate, ran = threading.Event(), []
        blocker = asyncio.create_task(registry.read(lambda store: gate.wait(30)))
        queued = asyncio.create_task(registry.read(lambda store: ran.append(store)))
        await asyncio.sleep(0.05)
        queued.cancel()
        gate.set()
        assert await blocker is True
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert await registry.read(lambda store: store.views.counts()) == {}
        assert ran == []
    finally:
        await registry.close_db()


# --- the protocol's limits ----------------------------------------------------------


@pytest.mark.parametrize("req_id", [2**64 - 1, 2**63])
def test_an_id_beyond_a_signed_64_bit_int_is_bad_request(raw: RawClient, req_id: int) -> None:
    reply = raw.call({"op": "status", "id": req_id})
    assert error_of(reply)[0] == "bad_request"
    assert "id" in reply["error"]["message"]
    assert call(raw, "status")["ok"] is True


def test_a_key_reused_with_another_payload_conflicts(raw: RawClient) -> None:
    run_id, key = new_run_id(), new_key()
    request = {"key": key, "run_id": run_id, "experiment": "keys", "params": {"lr": 0.1}}
    first = call(raw, "create", **request)
    assert first["ok"] is True
    again = call(raw, "create", **request)
    assert {**again, "id": first["id"]} == first
    code, message = error_of(call(raw, "create", **{**request, "params": {"lr": 0.2}}))
    assert code == "conflict" and key in message
    assert call(raw, "get", run=run_id)["run"]["params"] == {"lr": 0.1}


def test_a_key_without_a_digest_replays_as_before(raw: RawClient, daemon: Daemon) -> None:
    """A key remembered before schema 5 has no digest: it replays as it always did."""
    run_id, key = new_run_id(), new_key()
    first = call(raw, "create", key=key, run_id=run_id, experiment="old-keys")
    with sqlite3.connect(daemon.db) as db:
        db.execute("UPDATE idempotency SET digest = NULL WHERE key = ?", (key,))
    db.close()
    again = call(raw, "create", key=key, run_id=run_id, experiment="old-keys", tags={"x": 1})
    assert {**again, "id": first["id"]} == first
