"""Storage faults: a full disk and a locked database answer `unavailable`, never crash."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import Daemon, wait_for
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Artifact, Create, Get, ListRuns, RunnerdError


def create(conn: Connection, experiment: str = "storage") -> str:
    run_id = new_run_id()
    conn.call(
        Create(key=new_key(), run_id=run_id, experiment=experiment, params={"padding": "x" * 2000})
    )
    return run_id


@contextmanager
def tmpfs(mount: Path, size: str = "2m") -> Iterator[Path]:
    """A small private (0700) tmpfs mounted on the new folder `mount` (the test is skipped
    where mounting is not allowed)."""
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the registry."""
    with tmpfs(short_tmp / "state") as mount:
        yield mount


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all the free space of `folder`'s filesystem but `leave` bytes."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def test_full_disk_answers_unavailable_keeps_reads_and_recovers(
    short_tmp: Path, small_disk: Path
) -> None:
    daemon = Daemon(short_tmp).start()
    try:
        conn = Connection(daemon.socket)
        stored = [create(conn) for _ in range(5)]
        filler = fill(small_disk, leave=64 * 1024)
        error: RunnerdError | None = None
        for _ in range(2000):
            try:
                stored.append(create(conn))
            except RunnerdError as exc:
                error = exc
                break
        assert error is not None, "the disk never filled"
        assert error.code == "unavailable"
        assert "full" in error.message
        listed = conn.call(ListRuns(limit=10_000))["runs"]
        assert {r["run_id"] for r in listed} == set(stored)
        assert daemon.ctl("status").returncode == 0
        filler.unlink()
        recovered = create(conn)
        assert conn.call(Get(run=recovered))["run"]["run_id"] == recovered
        conn.close()
    finally:
        daemon.stop()
    with sqlite3.connect(daemon.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == len(stored) + 1
        assert db.execute("SELECT COUNT(*) FROM transitions").fetchone()[0] == len(stored) + 1


HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.readline()
    db.execute("ROLLBACK")
""")


def test_locked_database_waits_then_answers_unavailable(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    config = short_tmp / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("busy_timeout = 0.5\n")
    daemon.start()
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
        with pytest.raises(RunnerdError) as refused:
            create(conn)
        assert refused.value.code == "unavailable"
        assert "locked" in refused.value.message
        assert conn.call(Get(run=before))["run"]["state"] == "pending"
        locker.communicate("\n", timeout=30)
        after = wait_for(lambda: _try_create(conn), what="writes to resume")
        assert conn.call(Get(run=after))["run"]["run_id"] == after
        conn.close()
    finally:
        daemon.stop()


def _try_create(conn: Connection) -> str | None:
    try:
        return create(conn)
    except RunnerdError:
        return None


SPOOLING_CLIENT = textwrap.dedent("""
    import runnerd_client as rd
    with rd.run("disk-full-client") as run:
        run.heartbeat()
    print("experiment finished", flush=True)
""")


def test_a_client_whose_spool_disk_is_full_still_finishes(
    short_tmp: Path, small_disk: Path
) -> None:
    daemon = Daemon(short_tmp)  # never started: the client must spool, not beside the registry
    fill(small_disk, leave=0)
    proc = daemon.python(SPOOLING_CLIENT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "experiment finished"
    assert str(daemon.socket.parent / "spool") in err, err  # the runtime dir took the events


def test_artifact_paths_are_normalized_and_symlinks_followed_as_documented(
    daemon: Daemon, short_tmp: Path
) -> None:
    conn = Connection(daemon.socket)
    run_id = create(conn)
    target = short_tmp / "files" / "model.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    link = short_tmp / "latest.bin"
    link.symlink_to(target)
    (short_tmp / "dir-link").symlink_to(short_tmp / "files")
    dotted = conn.call(
        Artifact(key=new_key(), run_id=run_id, path=f"{short_tmp}/files/../files/./model.bin")
    )
    assert dotted["path"] == str(target)
    linked = conn.call(Artifact(key=new_key(), run_id=run_id, path=str(link)))
    assert linked["path"] == str(link) and linked["sha256"] == dotted["sha256"]
    for bad, words in (
        (short_tmp / "dir-link", "directory"),
        (short_tmp / "dangling", "does not exist"),
    ):
        if bad.name == "dangling":
            bad.symlink_to(short_tmp / "nowhere")
        with pytest.raises(RunnerdError) as refused:
            conn.call(Artifact(key=new_key(), run_id=run_id, path=str(bad)))
        assert refused.value.code == "bad_request" and words in refused.value.message
    with pytest.raises(RunnerdError):
        conn.call(Artifact(key=new_key(), run_id=run_id, path="relative/model.bin"))
    conn.close()
