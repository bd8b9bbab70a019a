"""The daemon's lifecycle: private socket, restarts, shutdown and a broken registry."""

from __future__ import annotations

import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import Daemon, wait_for

LIFECYCLE = textwrap.dedent("""
    import runnerd_client as rd
    with rd.run("restart", params={"n": 1}) as run:
        print(run.run_id)
""")


def run_one(daemon: Daemon) -> str:
    proc = daemon.python(LIFECYCLE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def test_socket_is_private(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700


def test_sigterm_stops_cleanly_and_a_restart_keeps_every_run(short_tmp: Path) -> None:
    first = Daemon(short_tmp).start()
    run_ids = [run_one(first) for _ in range(3)]
    assert first.stop(signal.SIGTERM) == 0
    assert not first.socket.exists()
    second = Daemon(short_tmp).start()
    try:
        listed = {r["run_id"]: r["state"] for r in second.ctl_json("list")}
        assert listed == dict.fromkeys(run_ids, "succeeded")
        assert run_one(second) not in run_ids
    finally:
        second.stop()


def test_sigkill_loses_no_acknowledged_event(short_tmp: Path) -> None:
    first = Daemon(short_tmp).start()
    run_id = run_one(first)
    first.stop(signal.SIGKILL)
    assert first.socket.exists()  # left behind: the next daemon must take it over
    second = Daemon(short_tmp).start()
    try:
        assert second.run_state(run_id) == "succeeded"
    finally:
        second.stop()


def test_second_daemon_on_the_same_socket_is_refused(daemon: Daemon) -> None:
    other = subprocess.run(
        [sys.executable, "-m", "runnerd"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert other.returncode == 1
    assert "already serving" in other.stderr
    assert daemon.ctl("status").returncode == 0


def test_corrupt_registry_is_a_clear_error_and_is_not_overwritten(short_tmp: Path) -> None:
    d = Daemon(short_tmp)
    d.db.parent.mkdir(parents=True)
    garbage = b"this is not a sqlite database" * 1000
    d.db.write_bytes(garbage)
    result = subprocess.run(
        [sys.executable, "-m", "runnerd"], env=d.env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"the registry {d.db} is damaged" in result.stderr
    assert d.db.read_bytes() == garbage


def test_schema_version_is_recorded(daemon: Daemon) -> None:
    run_one(daemon)
    with sqlite3.connect(daemon.db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_shutdown_finishes_in_flight_writes(daemon: Daemon) -> None:
    code = textwrap.dedent("""
        import sys
        from runnerd_client.connection import Connection
        from runnerd_client.ids import new_key, new_run_id
        from runnerd_client.protocol import Create
        conn = Connection()
        futures = [(rid, conn.send(Create(key=new_key(), run_id=rid, experiment="burst")))
                   for rid in (new_run_id() for _ in range(2000))]
        print("sent", flush=True)
        acked = [rid for rid, f in futures if f.result(60).get("ok")]
        print(len(acked), flush=True)
        print("\\n".join(acked), flush=True)
    """)
    proc = daemon.python(code)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "sent"
    daemon.stop(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    acked = out.split()[1:]
    restarted = Daemon(daemon.root).start()
    try:
        stored = {r["run_id"] for r in restarted.ctl_json("list", "--limit", "10000")}
        assert set(acked) <= stored
    finally:
        restarted.stop()


def test_config_file_with_unknown_key_is_refused(short_tmp: Path) -> None:
    d = Daemon(short_tmp)
    config = short_tmp / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("heartbeat_timout = 60\n")
    result = subprocess.run(
        [sys.executable, "-m", "runnerd"], env=d.env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "config.toml" in result.stderr and "heartbeat_timout" in result.stderr


def test_version(short_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runnerd", "--version"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "runnerd" in result.stdout and "0." in result.stdout


def test_daemon_log_names_socket_and_registry(daemon: Daemon) -> None:
    line = wait_for(
        lambda: next(
            (line for line in daemon.log.read_text().splitlines() if "serving" in line), None
        ),
        what="the serving line",
    )
    assert str(daemon.socket) in line and str(daemon.db) in line
