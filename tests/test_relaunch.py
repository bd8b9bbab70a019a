"""Relaunching a launched run: `retry` and `resume --interrupted` rerun the command with the
environment it ran with (kept private: shown only with --env), and the daemon says what
its start-up did (issue 21, items 19 and 20). Real daemons, real commands, real SIGKILLs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for

SECRET = "s3cr3t-token-7f2c"


def runnerctl(
    daemon: Daemon, *args: str, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runnerd.cli", *args],
        env={**daemon.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def only_run(daemon: Daemon, experiment: str) -> dict[str, Any]:
    runs = daemon.ctl_json("list", "--experiment", experiment)
    assert len(runs) == 1, runs
    run: dict[str, Any] = runs[0]
    return run


def test_retry_reruns_the_command_with_the_environment_it_ran_with(daemon: Daemon) -> None:
    first = runnerctl(
        daemon,
        "exec",
        "--experiment",
        "env",
        "--",
        "sh",
        "-c",
        'echo "FOO=$FOO"; exit 3',
        env={"FOO": "bar"},
    )
    assert (first.returncode, first.stdout) == (3, "FOO=bar\n")
    previous = only_run(daemon, "env")
    again = runnerctl(daemon, "retry", previous["run_id"])  # FOO is not set here
    assert (again.returncode, again.stdout) == (3, "FOO=bar\n"), again.stderr
    rerun = daemon.ctl_json("list", "--experiment", "env", "--limit", "1")[0]
    assert rerun["retry_of"] == previous["run_id"]
    assert daemon.ctl_json("show", rerun["run_id"], "--env")["env"]["FOO"] == "bar"


def test_the_environment_is_shown_only_when_asked(daemon: Daemon) -> None:
    result = runnerctl(
        daemon,
        "exec",
        "--experiment",
        "private",
        "--",
        "sh",
        "-c",
        "exit 1",
        env={"API_TOKEN": SECRET},
    )
    assert result.returncode == 1
    run_id = only_run(daemon, "private")["run_id"]
    for args in (
        ["show", run_id],
        ["show", run_id, "--json"],
        ["list", "--json"],
        ["export"],
        ["export", "--what", "failures"],
        ["failures", "--json"],
        ["status", "--json"],
        ["report", "--json"],
    ):
        out = daemon.ctl(*args).stdout
        assert SECRET not in out, args
    shown = daemon.ctl("show", run_id, "--env").stdout
    assert f"API_TOKEN={SECRET}" in shown
    assert daemon.ctl_json("show", run_id, "--env")["env"]["API_TOKEN"] == SECRET
    exported = [json.loads(line) for line in daemon.ctl("export", "--env").stdout.splitlines()]
    assert [r["env"]["API_TOKEN"] for r in exported if r["run_id"] == run_id] == [SECRET]
    assert "API_TOKEN" in daemon.ctl("show", run_id).stdout  # the names are not secret


def test_a_run_not_launched_by_exec_has_no_environment(daemon: Daemon) -> None:
    proc = daemon.python("import runnerd_client as rd\nprint(rd.connect().run('lib').run_id)")
    out, _ = proc.communicate(timeout=60)
    assert daemon.ctl_json("show", out.strip(), "--env")["env"] is None


HANGS_UNLESS_RESUMED = 'echo "FOO=$FOO" >> "$0"; [ -n "$RUNNERD_CHECKPOINT_DATA" ] || sleep 60'


def test_resume_interrupted_relaunches_with_the_environment_and_startup_says_what_it_did(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    daemon = Daemon(short_tmp).start()
    out = short_tmp / "seen.txt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            "cut",
            "--",
            "sh",
            "-c",
            HANGS_UNLESS_RESUMED,
            str(out),
        ],
        env={**daemon.env, "FOO": "bar"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    wait_for(lambda: out.exists() and out.read_text() == "FOO=bar\n", what="the command")
    daemon.stop(signal.SIGKILL)  # the machine goes down: the daemon and the run at once
    proc.kill()
    proc.communicate(timeout=30)
    daemon.as_if_rebooted()
    daemon = Daemon(short_tmp).start()
    try:
        said = wait_for(
            lambda: [line for line in daemon.log.read_text().splitlines() if "start-up:" in line][
                1:
            ],
            what="the start-up line",
        )
        assert (
            "replayed 0 spooled events, marked 1 run interrupted; recovered 0 active runs"
            in said[0]
        ), said
        [cut] = daemon.ctl_json("list", "--experiment", "cut")
        assert cut["failure"]["failure_class"] == "Interrupted"
        resumed = runnerctl(daemon, "resume", "--interrupted", env={"FOO": ""})
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"{cut['run_id']} -> " in resumed.stdout
        assert out.read_text() == "FOO=bar\nFOO=bar\n"  # FOO from the recorded environment
    finally:
        daemon.stop()
