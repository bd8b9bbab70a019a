"""runnerctl status, list and show as a user runs them: output and exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon
from runnerd.cli import parse_duration

RUNS = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    client = rd.connect()
    ok = client.run("train", variation="lr=0.1", params={"lr": 0.1}).start().succeed()
    bad = client.run("train", variation="lr=9").start()
    bad.fail(message="loss is nan", failure_class="FloatingPointError")
    live = client.run("eval").start()
    print(ok.run_id, bad.run_id, live.run_id, flush=True)
    sys.stdin.read()  # keep the live run's process alive until the test ends
""")


@pytest.fixture
def three_runs(daemon: Daemon) -> Iterator[tuple[str, str, str]]:
    proc = daemon.python(RUNS, stdin=subprocess.PIPE)
    assert proc.stdout is not None
    ok, bad, live = proc.stdout.readline().split()
    yield ok, bad, live
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_status_shows_counts_active_runs_and_failures(
    daemon: Daemon, three_runs: tuple[str, str, str]
) -> None:
    ok, bad, live = three_runs
    text = daemon.ctl("status").stdout
    assert "3 run(s): 1 running, 1 succeeded, 1 failed_crash" in text
    assert str(daemon.socket) in text
    active = text.split("Active runs")[1].split("Latest failures")[0]
    assert live in active and ok not in active
    assert "FloatingPointError: loss is nan" in text.split("Latest failures")[1]
    body = daemon.ctl_json("status")
    assert body["counts"] == {"running": 1, "succeeded": 1, "failed_crash": 1}
    assert body["daemon"]["socket"] == str(daemon.socket)
    assert [r["run_id"] for r in body["active"]] == [live]
    assert [f["run_id"] for f in body["failures"]] == [bad]


def test_list_filters_and_orders_newest_first(
    daemon: Daemon, three_runs: tuple[str, str, str]
) -> None:
    ok, bad, live = three_runs
    assert [r["run_id"] for r in daemon.ctl_json("list")] == [live, bad, ok]
    assert [r["run_id"] for r in daemon.ctl_json("list", "--state", "failed_crash")] == [bad]
    assert [r["run_id"] for r in daemon.ctl_json("list", "--experiment", "train")] == [bad, ok]
    assert [r["run_id"] for r in daemon.ctl_json("list", "--limit", "1")] == [live]
    assert daemon.ctl_json("list", "--since", "1h") != []
    table = daemon.ctl("list").stdout.splitlines()
    assert table[0].split()[:5] == ["RUN", "EXPERIMENT", "VARIATION", "ATT", "STATE"]
    assert len(table) == 4


def test_run_objects_carry_the_spec_fields(
    daemon: Daemon, three_runs: tuple[str, str, str]
) -> None:
    run = daemon.ctl_json("list")[0]
    for key in (
        "run_id",
        "experiment",
        "variation",
        "attempt",
        "state",
        "params",
        "run_dir",
        "pids",
        "created_at",
        "started_at",
        "ended_at",
        "last_heartbeat_at",
        "failure",
    ):
        assert key in run
    assert run["created_at"].endswith("Z")


def test_show_accepts_a_unique_prefix_and_prints_the_failure(
    daemon: Daemon, three_runs: tuple[str, str, str]
) -> None:
    _, bad, _ = three_runs
    prefix = bad[:12]
    assert daemon.ctl_json("show", prefix)["run_id"] == bad
    text = daemon.ctl("show", prefix).stdout
    assert bad in text
    assert "Transitions" in text and "failed_crash" in text
    assert "FloatingPointError (crash)" in text and "loss is nan" in text


def test_show_of_an_unknown_run_exits_4(daemon: Daemon) -> None:
    result = daemon.ctl("show", "NOSUCHRUN", check=False)
    assert result.returncode == 4
    assert "no run" in result.stderr


def test_ambiguous_prefix_is_an_error(daemon: Daemon, three_runs: tuple[str, str, str]) -> None:
    result = daemon.ctl("show", three_runs[0][:2], check=False)
    assert result.returncode == 1
    assert "more than one run" in result.stderr


def test_daemon_not_running_exits_3_with_a_clear_message(short_tmp: Path) -> None:
    result = Daemon(short_tmp).ctl("status", check=False)
    assert result.returncode == 3
    assert "not reachable" in result.stderr and "runnerd" in result.stderr


def test_bad_usage_exits_2(daemon: Daemon) -> None:
    assert daemon.ctl("list", "--state", "sleeping", check=False).returncode == 2
    assert daemon.ctl("list", "--since", "yesterday", check=False).returncode == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d12h", 129600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_runnerctl_starts_without_the_daemon_or_the_dask_side() -> None:
    """Every runnerctl call pays its imports: the daemon's modules, SQLite, asyncio and
    Dask's side are loaded only by the commands and options that use them, and so are the
    sweep workers' multiprocessing and tempfile (with shutil and the compressors)."""
    heavy = (
        "asyncio",
        "sqlite3",
        "distributed",
        "runnerd.registry",
        "runnerd.diagnosis",
        "multiprocessing",
        "tempfile",
    )
    code = f"import sys, runnerd.cli; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
