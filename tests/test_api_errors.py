"""The Python API: a wrong call is an error at the call, a refused run raises, and a run
ended from outside is said so once; never a silently untracked run (issue 21, items 6-9).

Each case runs in a client process of its own against the real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from subprocess import Popen

import pytest

from conftest import Daemon, wait_for

TRY = textwrap.dedent("""
    import json, sys
    import runnerd_client as rd
    c = rd.connect()
    def f(**params):
        return 1
    try:
        {call}
    except Exception as exc:
        print(json.dumps([type(exc).__name__, str(exc)]))
    else:
        print(json.dumps(None))
""")

WRONG_CALLS = {
    "experiment-not-a-str": (
        "c.run(123).start()",
        "TypeError",
        "experiment must be a str, not int 123",
    ),
    "empty-experiment": ('rd.run("")', "ValueError", "experiment must be 1-256 characters"),
    "variation-not-a-str": ('rd.run("w", variation=7)', "TypeError", "variation must be a str"),
    "nan-param": (
        'rd.run("w", params={"a": float("nan")})',
        "ValueError",
        "params must be plain JSON: it holds NaN or infinity",
    ),
    "object-param": (
        'rd.run("w", params={"a": object()})',
        "ValueError",
        "params must be plain JSON: Object of type object",
    ),
    "params-not-a-dict": (
        'rd.run("w", params=[1, 2])',
        "TypeError",
        "params must be a dict or None, not list",
    ),
    "negative-deadline": (
        'rd.run("w", deadline=-1)',
        "ValueError",
        "deadline must be positive, not -1",
    ),
    "zero-grace": ('rd.run("w", lost_grace=0)', "ValueError", "lost_grace must be positive"),
    "timeout-as-text": (
        'rd.run("w", heartbeat_timeout="10")',
        "TypeError",
        "heartbeat_timeout must be a number or None, not str '10'",
    ),
    "zero-interval": (
        'rd.run("w", heartbeat_interval=0)',
        "ValueError",
        "heartbeat_interval must be positive",
    ),
    "negative-stall-timeout": (
        'rd.run("w", stall_timeout=-5)',
        "ValueError",
        "stall_timeout must be 0 (never) or positive",
    ),
    "negative-retries": (
        'rd.retrying(f, experiment="r", retries=-1)',
        "ValueError",
        "retries must be 0 or more, not -1",
    ),
    "retrying-retry-on": (
        'rd.retrying(f, experiment="r", retry_on="x")',
        "ValueError",
        "retry_on must be one of retryable, any, not 'x'",
    ),
    "negative-backoff": (
        'rd.retrying(f, experiment="r", backoff=-1.0)',
        "ValueError",
        "backoff must be 0 or more",
    ),
    "retrying-no-function": (
        'rd.retrying(None, experiment="r")',
        "TypeError",
        "fn must be callable, not NoneType None",
    ),
    "cells-of-ints": (
        'rd.sweep("s", [1, 2], f)',
        "TypeError",
        "cells[0] must be a dict of params, not int 1",
    ),
    "cells-not-a-list": (
        'rd.sweep("s", 5, f)',
        "TypeError",
        "cells must be an iterable of dicts of params, not int 5",
    ),
    "zero-jobs": (
        'rd.sweep("s", [{"a": 1}], f, jobs=0)',
        "ValueError",
        "jobs must be 1 or more, not 0",
    ),
    "sweep-retry-on": (
        'rd.sweep("s", [{"a": 1}], f, retry_on="x")',
        "ValueError",
        "retry_on must be one of retryable, any",
    ),
    "sweep-policy": (
        'rd.sweep("s", [{"a": 1}], f, failure_policy="sometimes")',
        "ValueError",
        "failure_policy must be one of fail_fast, continue_on_failure",
    ),
    "nan-cell": (
        'rd.sweep("s", [{"a": float("nan")}], f)',
        "ValueError",
        "cells[0] must be plain JSON: it holds NaN or infinity",
    ),
    "sweep-empty-experiment": (
        'rd.sweep("", [{"a": 1}], f)',
        "ValueError",
        "experiment must be 1-256 characters",
    ),
    "sweep-no-function": (
        'rd.sweep("s", [{"a": 1}], "train")',
        "TypeError",
        "fn must be callable, not str 'train'",
    ),
    "resume-zero-jobs": (
        'rd.resume_sweep("S", f, jobs=0)',
        "ValueError",
        "jobs must be 1 or more, not 0",
    ),
}


def run_count(daemon: Daemon) -> tuple[int, int]:
    """Runs and sweeps the daemon has."""
    return (
        len(daemon.ctl_json("list", "--limit", "10000")),
        len(daemon.ctl_json("sweep", "list", "--limit", "10000")),
    )


def attempt(daemon: Daemon, call: str) -> list[str] | None:
    proc = daemon.python(TRY.format(call=call))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: list[str] | None = json.loads(out.splitlines()[-1])
    return result


@pytest.mark.parametrize(("call", "error", "words"), WRONG_CALLS.values(), ids=WRONG_CALLS.keys())
def test_a_wrong_argument_raises_at_the_call_and_nothing_is_sent(
    shared_daemon: Daemon, call: str, error: str, words: str
) -> None:
    before = run_count(shared_daemon)
    raised(attempt(shared_daemon, call), error, words)
    assert run_count(shared_daemon) == before  # no run or sweep made, none pending


def raised(result: list[str] | None, error: str, words: str) -> None:
    assert result is not None, "the call raised nothing"
    assert result[0] == error and words in result[1], result


RUN_CALLS = {
    "bogus-reason": (
        'run.fail(reason="bogus")',
        "ValueError",
        "reason must be one of crash, abandoned, timeout, not 'bogus'",
    ),
    "message-not-text": ("run.fail(message=42)", "TypeError", "message must be a str or None"),
    "infinite-checkpoint": (
        'run.checkpoint({"loss": float("inf")})',
        "ValueError",
        "data must be plain JSON",
    ),
}


@pytest.mark.parametrize(("call", "error", "words"), RUN_CALLS.values(), ids=RUN_CALLS.keys())
def test_a_wrong_call_on_a_run_raises_and_the_run_goes_on(
    shared_daemon: Daemon, call: str, error: str, words: str
) -> None:
    code = TRY.format(
        call=textwrap.indent(
            textwrap.dedent(f"""
        run = c.run("wrong-call").start()
        print(run.run_id)
        try:
            {call}
        finally:
            run.succeed()
    """),
            "    ",
        ).strip()
    )
    proc = shared_daemon.python(code)
    out, err = proc.communicate(timeout=60)
    run_id, outcome = out.splitlines()
    raised(json.loads(outcome), error, words)
    assert shared_daemon.run_state(run_id) == "succeeded"  # the wrong call lost nothing
    assert "refused" not in err


def test_a_create_the_daemon_refuses_raises_run_refused(shared_daemon: Daemon) -> None:
    """Params nested deeper than the daemon takes pass the client's checks; the daemon's
    bad_request reaches the experiment as RunRefused, before its code runs untracked."""
    proc = shared_daemon.python(
        textwrap.dedent("""
        import runnerd_client as rd
        deep = {}
        for _ in range(70):
            deep = {"a": deep}
        try:
            with rd.run("refused", params=deep):
                print("ran untracked")
        except rd.RunRefused as exc:
            assert isinstance(exc, rd.RunnerdError)
            print("RunRefused", exc.code, exc.run_id, exc.message)
    """)
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("RunRefused bad_request "), out + err
    assert "nest" in out and "ran untracked" not in out
    assert shared_daemon.ctl_json("list", "--experiment", "refused") == []


def test_a_resume_with_other_params_raises_run_refused(shared_daemon: Daemon) -> None:
    proc = shared_daemon.python(
        textwrap.dedent("""
        import runnerd_client as rd
        try:
            with rd.run("changed", params={"lr": 0.1}):
                raise ValueError("diverged")
        except ValueError:
            pass
        try:
            rd.run("changed", params={"lr": 0.2}, resume=True)
        except rd.RunRefused as exc:
            print(exc.code, exc.message)
    """)
    )
    out, err = proc.communicate(timeout=60)
    assert out.startswith("conflict ") and "lr" in out, out + err


def test_an_unreachable_daemon_raises_nothing(daemon: Daemon) -> None:
    daemon.stop()
    proc = daemon.python(
        textwrap.dedent("""
        import runnerd_client as rd
        with rd.run("away") as run:
            print(run.run_id)
        print("done")
    """)
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    run_id, done = out.split()
    assert done == "done"
    daemon.start()
    wait_for(
        lambda: (daemon.run_if_known(run_id) or {}).get("state") == "succeeded",
        timeout=30,
        what="the spooled run replayed",
    )


SLEEPER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import runnerd_client as rd
    go = Path(sys.argv[1])
    with rd.run("from-outside", heartbeat_interval=0.1) as run:
        print(run.run_id, flush=True)
        while not go.exists():
            time.sleep(0.05)
    print("went on", flush=True)
""")


def ended_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "ended from outside" in line]


def test_a_run_cancelled_with_sigterm_says_so_once(
    shared_daemon: Daemon, short_tmp: Path, procs: list[Popen[str]]
) -> None:
    proc = shared_daemon.python(SLEEPER, str(short_tmp / "never"))
    procs.append(proc)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    shared_daemon.ctl("cancel", run_id, "--signal", "TERM")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = ended_lines(err)
    assert len(lines) == 1, err
    assert f"run {run_id} was ended from outside (failed_abandoned: Cancelled" in lines[0]
    assert "refused" not in err and "invalid_transition" not in err, err


def test_a_run_cancelled_while_its_code_runs_on_says_so_once(
    shared_daemon: Daemon, short_tmp: Path, procs: list[Popen[str]]
) -> None:
    """Its heartbeats are answered invalid_transition first, then its succeed: one line."""
    go = short_tmp / "go"
    proc = shared_daemon.python(SLEEPER, str(go))
    procs.append(proc)
    assert proc.stdout is not None and proc.stderr is not None
    run_id = proc.stdout.readline().strip()
    shared_daemon.ctl("cancel", run_id)
    line = wait_for(
        lambda: proc.stderr.readline() if proc.poll() is None else "exited",
        timeout=30,
        what="the client to say its run was ended",
    )
    assert "ended from outside (failed_abandoned: Cancelled" in line, line
    go.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "went on"
    assert err == "", err  # said once: its own succeed is refused silently
    assert shared_daemon.run_state(run_id) == "failed_abandoned"


def test_a_client_side_deadline_records_and_says_so(
    shared_daemon: Daemon, short_tmp: Path, procs: list[Popen[str]]
) -> None:
    """`deadline` only records (README): the daemon ends the run failed_timeout, the code
    runs on, and the client says so once."""
    go = short_tmp / "go"
    proc = shared_daemon.python(SLEEPER.replace("heartbeat_interval=0.1", "deadline=0.5"), str(go))
    procs.append(proc)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    wait_for(
        lambda: shared_daemon.run_state(run_id) == "failed_timeout", timeout=30, what="the deadline"
    )
    go.touch()
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out.strip()) == (0, "went on")
    assert len(ended_lines(err)) == 1 and "failed_timeout" in err, err


def test_a_process_attaching_to_an_unknown_run_raises(shared_daemon: Daemon) -> None:
    proc = shared_daemon.python(
        textwrap.dedent("""
        import runnerd_client as rd
        try:
            rd.current_run()
        except rd.RunRefused as exc:
            print(exc.code)
    """),
        env={"RUNNERD_RUN_ID": "NOSUCHRUN"},
    )
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "unknown_run", out + err


def test_no_daemon_process_is_left_pending(shared_daemon: Daemon) -> None:
    """None of the wrong calls above left a run pending."""
    assert [r["run_id"] for r in shared_daemon.ctl_json("list", "--state", "pending")] == []


HOLDER = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    c = rd.connect()
    pending = c.run("states")
    running = c.run("states").start()
    print(pending.run_id, running.run_id, flush=True)
    sys.stdin.read()
    running.succeed()
""")


def test_list_takes_several_states(shared_daemon: Daemon, procs: list[Popen[str]]) -> None:
    proc = shared_daemon.python(HOLDER, stdin=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    pending, running = proc.stdout.readline().split()

    def listed(*states: str) -> set[str]:
        options = [arg for state in states for arg in ("--state", state)]
        return {
            r["run_id"] for r in shared_daemon.ctl_json("list", "--experiment", "states", *options)
        }

    assert listed("pending", "running") == {pending, running}
    assert listed("pending") == {pending}
    assert listed("RUNNING") == {running}  # a choice in any case
    proc.communicate("", timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--experiment", "a", "--experiment", "b"],
        ["list", "--limit", "5", "--limit=6"],
        ["exec", "--variation", "a", "--variation", "b", "--", "true"],
        ["sweep", "show", "X", "--json", "--json"],
    ],
    ids=["experiment", "limit", "exec-variation", "flag"],
)
def test_an_option_given_twice_is_a_usage_error(shared_daemon: Daemon, args: list[str]) -> None:
    """An option that takes one value refuses a second, instead of keeping the last."""
    before = run_count(shared_daemon)
    result = shared_daemon.ctl(*args, check=False)
    option = next(a for a in args[1:] if a.startswith("--")).split("=")[0]
    assert result.returncode == 2, result.stderr
    assert f"{option} given more than once" in result.stderr
    assert run_count(shared_daemon) == before


@pytest.mark.parametrize(
    "args",
    [
        ["show", "NOPE"],
        ["list", "--sweep", "NOPE"],
        ["sweep", "show", "NOPE"],
        ["sweep", "resume", "NOPE"],
        ["sweep", "replicate", "NOPE"],
        ["cancel", "NOPE"],
        ["retry", "NOPE"],
        ["follow", "--sweep", "NOPE"],
    ],
)
def test_no_such_thing_exits_4(shared_daemon: Daemon, args: list[str]) -> None:
    result = shared_daemon.ctl(*args, check=False)
    assert result.returncode == 4, result.stderr
    assert "matches" in result.stderr and "NOPE" in result.stderr


def test_runnerd_takes_a_log_level_in_any_case(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    result = subprocess.run(
        [sys.executable, "-m", "runnerd", "--log-level", "INFO", "--check-config"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
