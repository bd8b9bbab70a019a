"""runnerctl exec, retry and cancel with real commands, and rd.retrying."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for


def runnerctl(daemon: Daemon, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "runnerd.cli", *args],
        env=daemon.env,
        capture_output=True,
        timeout=120,
        **kwargs,
    )


def latest(daemon: Daemon, experiment: str) -> dict[str, Any]:
    run_id = daemon.ctl_json("list", "--experiment", experiment, "--limit", "1")[0]["run_id"]
    run: dict[str, Any] = daemon.ctl_json("show", run_id)
    return run


@pytest.mark.parametrize(
    ("command", "code", "state", "failure_class", "exit_code", "sig"),
    [
        (["true"], 0, "succeeded", None, None, None),
        (["false"], 1, "failed_crash", "ExitCode", 1, None),
        (["sh", "-c", "exit 3"], 3, "failed_crash", "ExitCode", 3, None),
        (["sh", "-c", "kill -KILL $$"], 137, "failed_crash", "Signal:SIGKILL", -9, "SIGKILL"),
        (
            [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"],
            139,
            "failed_crash",
            "Signal:SIGSEGV",
            -11,
            "SIGSEGV",
        ),
    ],
)
def test_exec_records_how_the_command_ended(
    daemon: Daemon,
    command: list[str],
    code: int,
    state: str,
    failure_class: str | None,
    exit_code: int | None,
    sig: str | None,
) -> None:
    result = runnerctl(daemon, "exec", "--experiment", "ending", "--", *command)
    assert result.returncode == code
    run = latest(daemon, "ending")
    assert run["state"] == state
    failure = run["failure"] or {}
    assert failure.get("failure_class") == failure_class
    assert failure.get("exit_code") == exit_code
    assert failure.get("signal") == sig
    logs = [Path(run["run_dir"], name) for name in ("stdout.log", "stderr.log")]
    assert all(log.exists() for log in logs)
    assert {Path(a["path"]).name for a in run["artifacts"]} == {
        log.name for log in logs if log.stat().st_size
    }  # empty logs are not artifacts
    assert run["launch"]["command"] == command


def test_timeout_terminates_the_command_and_ends_failed_timeout(daemon: Daemon) -> None:
    result = runnerctl(
        daemon, "exec", "--experiment", "slow", "--timeout", "1", "--", "sleep", "60"
    )
    assert result.returncode == 128 + signal.SIGTERM
    run = latest(daemon, "slow")
    assert run["state"] == "failed_timeout"
    assert run["failure"]["failure_class"] == "Timeout"
    assert run["failure"]["retryable"] is True


FLAKY = textwrap.dedent("""
    import sys
    from pathlib import Path
    counter = Path(sys.argv[1])
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if n < 2:
        raise ConnectionError(f"connection reset by peer (try {n})")
    print("finally worked")
""")


def test_flaky_command_is_retried_until_it_succeeds(daemon: Daemon, short_tmp: Path) -> None:
    script = short_tmp / "flaky.py"
    script.write_text(FLAKY)
    result = runnerctl(
        daemon,
        "exec",
        "--experiment",
        "flaky",
        "--retries",
        "3",
        "--backoff",
        "0.1",
        "--",
        sys.executable,
        str(script),
        str(short_tmp / "count"),
    )
    assert result.returncode == 0
    assert b"finally worked" in result.stdout
    runs = sorted(daemon.ctl_json("list", "--experiment", "flaky"), key=lambda r: r["attempt"])
    assert [(r["attempt"], r["state"]) for r in runs] == [
        (1, "failed_crash"),
        (2, "failed_crash"),
        (3, "succeeded"),
    ]
    assert [r["retry_of"] for r in runs] == [None, runs[0]["run_id"], runs[1]["run_id"]]
    assert runs[0]["failure"]["category"] == "network"


def test_a_bug_is_not_retried(daemon: Daemon) -> None:
    result = runnerctl(
        daemon,
        "exec",
        "--experiment",
        "bug",
        "--retries",
        "3",
        "--backoff",
        "0.1",
        "--",
        sys.executable,
        "-c",
        "import no_such_module_here",
    )
    assert result.returncode == 1
    assert b"not retryable" in result.stderr
    [run] = daemon.ctl_json("list", "--experiment", "bug")
    assert run["failure"]["category"] == "dependency"
    assert run["failure"]["failure_class"] == "ModuleNotFoundError"
    assert "no_such_module_here" in run["failure"]["message"]


def test_ten_megabytes_of_output_arrive_whole(daemon: Daemon) -> None:
    code = "import sys\nfor i in range(100_000): sys.stdout.write(f'{i:099d}\\n')"
    result = runnerctl(daemon, "exec", "--experiment", "chatty", "--", sys.executable, "-c", code)
    assert result.returncode == 0
    assert len(result.stdout) == 10_000_000
    run = latest(daemon, "chatty")
    log = Path(run["run_dir"]) / "stdout.log"
    assert log.read_bytes() == result.stdout
    sizes = {Path(a["path"]).name: a["size"] for a in run["artifacts"]}
    assert sizes["stdout.log"] == 10_000_000


def test_cancel_with_signal_stops_the_command(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            "cancelled",
            "--",
            "sleep",
            "60",
        ],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run_id = wait_for(
        lambda: [
            r["run_id"]
            for r in daemon.ctl_json("list", "--experiment", "cancelled", "--state", "running")
        ],
        what="the exec'd run",
    )[0]
    result = daemon.ctl("cancel", run_id, "--signal", "TERM")
    assert "failed_abandoned" in result.stdout and "sent SIGTERM" in result.stdout
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    run = daemon.ctl_json("show", run_id)
    assert run["state"] == "failed_abandoned"
    assert run["failure"]["failure_class"] == "Cancelled"


def test_sigint_to_exec_is_forwarded_and_abandons_the_run(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            "interrupted",
            "--",
            "sleep",
            "60",
        ],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(
        lambda: daemon.ctl_json("list", "--experiment", "interrupted", "--state", "running"),
        what="the exec'd run",
    )
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT
    run = latest(daemon, "interrupted")
    assert run["state"] == "failed_abandoned"
    assert run["failure"]["failure_class"] == "KeyboardInterrupt"


GRANDCHILD = textwrap.dedent("""
    import subprocess, sys
    child = (
        "import runnerd_client as rd\\n"
        "from pathlib import Path\\n"
        "with rd.current_run() as run:\\n"
        "    out = Path(run.run_dir) / 'from-grandchild.txt'\\n"
        "    out.write_text('hello')\\n"
        "    run.artifact(out)\\n"
    )
    subprocess.run([sys.executable, "-c", child], check=True)
""")


def test_a_grandchild_reports_into_the_execd_run(daemon: Daemon, short_tmp: Path) -> None:
    script = short_tmp / "parent.py"
    script.write_text(GRANDCHILD)
    result = runnerctl(daemon, "exec", "--experiment", "family", "--", sys.executable, str(script))
    assert result.returncode == 0, result.stderr
    run = latest(daemon, "family")
    assert run["state"] == "succeeded"
    names = {Path(a["path"]).name for a in run["artifacts"]}
    assert "from-grandchild.txt" in names


def test_retry_reruns_the_same_command_as_the_next_attempt(daemon: Daemon) -> None:
    first = runnerctl(
        daemon, "exec", "--experiment", "again", "--param", "lr=0.5", "--", "sh", "-c", "exit 5"
    )
    assert first.returncode == 5
    previous = latest(daemon, "again")
    again = runnerctl(daemon, "retry", previous["run_id"][:12])
    assert again.returncode == 5
    rerun = latest(daemon, "again")
    assert rerun["attempt"] == previous["attempt"] + 1
    assert rerun["retry_of"] == previous["run_id"]
    assert rerun["params"] == {"lr": 0.5}
    assert rerun["launch"]["command"] == ["sh", "-c", "exit 5"]


def test_retry_of_a_run_not_launched_by_exec_is_refused(daemon: Daemon) -> None:
    proc = daemon.python("import runnerd_client as rd\nprint(rd.connect().run('x').run_id)")
    out, _ = proc.communicate(timeout=60)
    result = daemon.ctl("retry", out.strip(), check=False)
    assert result.returncode == 1
    assert "not launched by exec" in result.stderr


RETRYING = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return x * 2

    def buggy():
        calls.append(0)
        raise ValueError("bad input")

    print(rd.retrying(flaky, 21, experiment="api", backoff=0.1), len(calls))
    calls.clear()
    try:
        rd.retrying(buggy, experiment="api-bug", backoff=0.1)
    except ValueError:
        print("raised after", len(calls))
""")


def test_retrying_api(daemon: Daemon) -> None:
    proc = daemon.python(RETRYING)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["42 3", "raised after 1"]
    runs = sorted(daemon.ctl_json("list", "--experiment", "api"), key=lambda r: r["attempt"])
    assert [r["state"] for r in runs] == ["failed_crash", "failed_crash", "succeeded"]
    assert runs[2]["retry_of"] == runs[1]["run_id"]
    assert len(daemon.ctl_json("list", "--experiment", "api-bug")) == 1


def test_exec_of_a_missing_command_is_a_clear_failure(daemon: Daemon) -> None:
    result = runnerctl(daemon, "exec", "--experiment", "missing", "--", "/no/such/command-here")
    assert result.returncode == 127
    run = latest(daemon, "missing")
    assert run["state"] == "failed_crash"
    assert "cannot run" in run["failure"]["message"]


def test_exec_needs_no_daemon_to_run_the_command(short_tmp: Path) -> None:
    away = Daemon(short_tmp)
    result = subprocess.run(
        [sys.executable, "-m", "runnerd.cli", "exec", "--", "sh", "-c", "echo works; exit 4"],
        env=away.env,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 4
    assert result.stdout == b"works\n"
    assert os.listdir(short_tmp / "state" / "spool")


BAD_OPTIONS = {
    "empty-variation": (["--variation", ""], "--variation", "1-256 characters"),
    "empty-experiment": (["--experiment", ""], "--experiment", "1-256 characters"),
    "long-variation": (["--variation", "v" * 300], "--variation", "1-256 characters"),
    "zero-timeout": (["--timeout", "0"], "--timeout", "positive"),
    "negative-timeout": (["--timeout", "-5"], "--timeout", "positive"),
    "zero-memory": (["--memory", "0"], "--memory", "positive"),
    "param-without-value": (["--param", "lr"], "--param", "is not k=v"),
    "nan-param": (["--param", "lr=NaN"], "--param", "NaN or infinity"),
    "negative-retries": (["--retries", "-1"], "--retries", "-1"),
    "retry-on": (["--retry-on", "sometimes"], "--retry-on", "sometimes"),
}


@pytest.mark.parametrize(("options", "option", "why"), BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_a_bad_option_is_a_usage_error_before_anything_runs(
    shared_daemon: Daemon, short_tmp: Path, options: list[str], option: str, why: str
) -> None:
    """Every option is checked before the command is launched: exit 2 naming it, no run
    recorded, the command never started."""
    ran = short_tmp / "ran"
    before = len(shared_daemon.ctl_json("list", "--limit", "10000"))
    result = runnerctl(shared_daemon, "exec", *options, "--", "touch", str(ran))
    assert result.returncode == 2, result.stderr
    assert option in result.stderr.decode() and why in result.stderr.decode(), result.stderr
    assert not ran.exists()
    assert len(shared_daemon.ctl_json("list", "--limit", "10000")) == before


def test_a_command_that_cannot_be_started_says_why(shared_daemon: Daemon) -> None:
    result = runnerctl(
        shared_daemon, "exec", "--experiment", "missing-said", "--", "/no/such/command-here"
    )
    assert result.returncode == 127
    assert b"runnerctl: cannot run /no/such/command-here: " in result.stderr
    assert b"No such file or directory" in result.stderr


def test_an_exported_failure_names_its_task_worker_and_phase(shared_daemon: Daemon) -> None:
    """Outside Dask the task is the run and the worker its host (issue 21, item 15)."""
    result = runnerctl(shared_daemon, "exec", "--experiment", "exported", "--", "false")
    assert result.returncode == 1
    run = latest(shared_daemon, "exported")
    lines = shared_daemon.ctl("export", "--what", "failures").stdout.splitlines()
    [record] = [r for r in map(json.loads, lines) if r["run_id"] == run["run_id"]]
    assert record["details"] == {
        "phase": "running",
        "task_id": run["run_id"],
        "worker_id": run["host"],
        "traceback": None,
    }
