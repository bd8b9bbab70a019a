"""runnerd as a user service: sd_notify, socket activation, units, config, backup, prune."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import Daemon, wait_for


def receive_all(sock: socket.socket, until: float) -> list[str]:
    """Datagrams until the monotonic deadline `until`."""
    messages = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return messages


def test_notify_ready_status_watchdog_and_stopping(short_tmp: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify.sock"))
    daemon = Daemon(short_tmp)
    env = {**daemon.env, "NOTIFY_SOCKET": str(short_tmp / "notify.sock"), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runnerd"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        notify.settimeout(15)
        first = notify.recv(4096).decode()
        assert "READY=1" in first.split("\n") and f"MAINPID={proc.pid}" in first
        started = time.monotonic()
        messages = receive_all(notify, started + 1.0)
        pings = [m for m in messages if "WATCHDOG=1" in m.split("\n")]
        assert len(pings) >= 4, messages  # every 0.2 s: half of WatchdogSec
        assert any(m.startswith("STATUS=") and "runs" in m for m in messages)
        proc.send_signal(signal.SIGTERM)
        rest = receive_all(notify, time.monotonic() + 5)
        assert any("STOPPING=1" in m.split("\n") for m in rest)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_socket_activation(short_tmp: Path) -> None:
    path = short_tmp / "activated.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen()
    daemon = Daemon(short_tmp)
    env = {**daemon.env, "RUNNERD_SOCKET": str(short_tmp / "not-this-one.sock"), "LISTEN_FDS": "1"}
    fd = listening.fileno()
    proc = subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m", "runnerd"],
        env=env,
        preexec_fn=lambda: os.dup2(fd, 3),
        close_fds=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    listening.close()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "runnerd.cli", "--socket", str(path), "status", "--json"],
            env=daemon.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert not (short_tmp / "not-this-one.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert path.exists()  # systemd's socket: left for systemd to manage
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)
def test_installed_units_pass_systemd_analyze_verify(short_tmp: Path) -> None:
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(short_tmp / "config"),
        "XDG_RUNTIME_DIR": str(short_tmp / "rt"),
    }
    (short_tmp / "rt").mkdir(mode=0o700)
    out = subprocess.run(
        [sys.executable, "-m", "runnerd.cli", "service", "install", "--no-enable"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    units = short_tmp / "config" / "systemd" / "user"
    service = (units / "runnerd.service").read_text()
    assert f"ExecStart={sys.executable} -m runnerd" in service
    assert "Type=notify" in service and "WatchdogSec=" in service
    verify = subprocess.run(
        [
            "systemd-analyze",
            "--user",
            "verify",
            str(units / "runnerd.service"),
            str(units / "runnerd.socket"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    removed = subprocess.run(
        [sys.executable, "-m", "runnerd.cli", "service", "uninstall"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert removed.returncode == 0 and not (units / "runnerd.service").exists()


def start_fails(daemon: Daemon, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "runnerd", *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("heartbeat_timeout = 'soon'\n", ["heartbeat_timeout", "wrong type"]),
        ("lost_grace = -5\n", ["lost_grace", "positive"]),
        ("watched_dirs = ['relative/dir']\n", ["watched_dirs", "absolute"]),
        ("synchronous = 'SOMETIMES'\n", ["synchronous"]),
        ("this is not toml\n", ["config.toml"]),
    ],
)
def test_config_errors_name_the_file_and_key(short_tmp: Path, text: str, words: list[str]) -> None:
    daemon = Daemon(short_tmp)
    config = short_tmp / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(text)
    for args in ((), ("--check-config",)):
        stderr = start_fails(daemon, *args)
        assert str(config) in stderr
        for word in words:
            assert word in stderr


def test_check_config_accepts_a_good_file(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    config = short_tmp / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        f"heartbeat_timeout = 60\nretention = 86400\nwatched_dirs = ['{short_tmp}']\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "runnerd", "--check-config"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert "valid" in result.stdout


def test_a_registry_from_a_newer_runnerd_is_refused(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    daemon.db.parent.mkdir(parents=True)
    with sqlite3.connect(daemon.db) as conn:
        conn.execute("PRAGMA user_version = 99")
    stderr = start_fails(daemon)
    assert "newer" in stderr and str(daemon.db) in stderr


def test_journal_format_under_systemd(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    env = {**daemon.env, "JOURNAL_STREAM": "8:12345"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runnerd"],
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(daemon.socket.exists, what="the socket")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    lines = err.strip().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert not any(line[3:7].isdigit() for line in lines)  # no timestamps


WRITERS = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    client = rd.connect()
    for n in range(int(sys.argv[1])):
        run = client.run("backup-load", variation=f"{sys.argv[2]}-{n}").start()
        run.heartbeat()
        run.succeed() if n % 2 else run.fail(message="odd one out")
""")


def test_backup_while_8_clients_write_is_consistent(daemon: Daemon, short_tmp: Path) -> None:
    writers = [daemon.python(WRITERS, "150", str(n)) for n in range(8)]
    wait_for(
        lambda: len(daemon.ctl_json("list", "--limit", "10000")) >= 100, what="writes under way"
    )
    target = short_tmp / "backup.sqlite3"
    result = daemon.ctl("backup", str(target))
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert "backed up" in result.stdout
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = copy.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        assert 100 <= runs <= 1200
        mismatched = copy.execute(
            "SELECT COUNT(*) FROM runs r WHERE r.state != (SELECT to_state FROM transitions t"
            " WHERE t.run_id = r.run_id ORDER BY seq DESC LIMIT 1)"
        ).fetchone()[0]
        assert mismatched == 0
        orphans = copy.execute(
            "SELECT COUNT(*) FROM failures WHERE run_id NOT IN (SELECT run_id FROM runs)"
        ).fetchone()[0]
        assert orphans == 0
    assert len(daemon.ctl_json("list", "--limit", "10000")) == 1200


PRUNE_SET = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    client = rd.connect()
    for n in range(3):
        client.run("prune", variation=f"ok-{n}").start().succeed()
    for n in range(2):
        client.run("prune", variation=f"bad-{n}").start().fail(message="broken")
    live = client.run("prune", variation="live").start()
    print(live.run_id, flush=True)
    sys.stdin.read()
""")


def test_prune_removes_only_what_it_says(daemon: Daemon) -> None:
    proc = daemon.python(PRUNE_SET, stdin=subprocess.PIPE)
    assert proc.stdout is not None
    live = proc.stdout.readline().strip()

    def states() -> list[str]:
        return sorted(r["state"] for r in daemon.ctl_json("list"))

    try:
        assert daemon.ctl_json("prune", "--older-than", "1d")["count"] == 0
        dry = daemon.ctl_json("prune", "--older-than", "0", "--state", "failed_crash", "--dry-run")
        assert dry["count"] == 2 and dry["dry_run"] is True
        assert len(states()) == 6
        done = daemon.ctl_json("prune", "--older-than", "0", "--state", "failed_crash")
        assert sorted(done["run_ids"]) == sorted(dry["run_ids"])
        assert states() == ["running", "succeeded", "succeeded", "succeeded"]
        assert daemon.ctl_json("prune", "--older-than", "0")["count"] == 3
        assert [r["run_id"] for r in daemon.ctl_json("list")] == [live]
        assert daemon.ctl_json("failures") == []
        assert daemon.ctl("show", dry["run_ids"][0], check=False).returncode == 4
    finally:
        proc.communicate("", timeout=30)
