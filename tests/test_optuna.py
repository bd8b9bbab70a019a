"""Optuna trials as runs, and dead trials failed in Optuna's own storage by the hook: real
optuna with a sqlite storage, a real daemon with the hook in its config.toml, real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for

optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install -e '.[test]')")

pytestmark = pytest.mark.timeout(300)

HOOK = f"""
[[hooks]]
name = "optuna"
events = ["failed_*"]
mode = "stream"
command = {json.dumps([sys.executable, "-m", "runnerd_client.optuna", "hook"])}
"""

STUDY = """
    import os, sys, time
    import optuna
    from runnerd_client.optuna import tracked

    url, name, mode = sys.argv[1:]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        x = trial.suggest_float("x", -10, 10)
        if trial.number == 1:
            if mode == "raise":
                raise ValueError("diverged")
            if mode == "prune":
                trial.report(5.0, step=0)
                raise optuna.TrialPruned("pruned at step 0")
            if mode == "wait":
                print("ready", os.getpid(), flush=True)
                time.sleep(300)
        return (x - 2) ** 2

    study = optuna.create_study(study_name=name, storage=url, load_if_exists=True)
    study.optimize(tracked(objective, storage=url), n_trials=3, catch=(ValueError,))
"""


@pytest.fixture(scope="module")
def hooked() -> Iterator[Daemon]:
    """A daemon with the Optuna hook in its config.toml, and the study script beside it."""
    with tempfile.TemporaryDirectory(prefix="rd-", dir="/tmp") as name:
        daemon = Daemon(Path(name))
        daemon.config.parent.mkdir(parents=True)
        daemon.config.write_text(HOOK)
        (daemon.root / "study.py").write_text(textwrap.dedent(STUDY))
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.stop()


def storage_url(daemon: Daemon) -> str:
    return f"sqlite:///{daemon.root}/optuna.db"


def study(daemon: Daemon, name: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(daemon.root / "study.py"), storage_url(daemon), name, mode],
        env={**daemon.env, "PYTHONUNBUFFERED": "1"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def runs_of(daemon: Daemon, name: str) -> dict[str, dict[str, Any]]:
    """The study's runs by variation (`trial=N`), each as `show --json` prints it."""
    return {
        r["variation"]: daemon.ctl_json("show", r["run_id"])
        for r in daemon.ctl_json("list", "--experiment", name)
    }


def trials(daemon: Daemon, name: str) -> list[Any]:
    return list(optuna.load_study(study_name=name, storage=storage_url(daemon)).trials)


def delivered(daemon: Daemon) -> bool:
    """Whether the hook has handled every event logged so far."""
    body = daemon.ctl_json("hooks")
    (hook,) = body["hooks"]
    return hook["backlog"] == 0 and not hook["retrying"]


def note(run: dict[str, Any]) -> dict[str, Any]:
    path = next(a["path"] for a in run["artifacts"] if a["path"].endswith("optuna-trial.json"))
    recorded: dict[str, Any] = json.loads(Path(path).read_text())
    return recorded


@pytest.mark.parametrize(
    ("mode", "state", "failure_class", "optuna_state"),
    [
        ("ok", "succeeded", None, "COMPLETE"),
        ("raise", "failed_crash", "ValueError", "FAIL"),
        ("prune", "failed_abandoned", "TrialPruned", "PRUNED"),
    ],
)
def test_each_trial_is_a_run_ended_as_optuna_ends_it(
    hooked: Daemon, mode: str, state: str, failure_class: str | None, optuna_state: str
) -> None:
    name = f"study-{mode}"
    proc = study(hooked, name, mode)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    runs = runs_of(hooked, name)
    assert sorted(runs) == ["trial=0", "trial=1", "trial=2"]
    assert [runs[f"trial={n}"]["state"] for n in (0, 2)] == ["succeeded", "succeeded"]
    second = runs["trial=1"]
    assert second["state"] == state
    assert (second["failure"] or {}).get("failure_class") == failure_class
    assert second["tags"] == {
        "optuna.study": name,
        "optuna.trial": 1,
        "optuna.storage": storage_url(hooked),
    }
    wait_for(lambda: delivered(hooked), timeout=60, what="the hook to catch up")
    by_number = {t.number: t for t in trials(hooked, name)}
    assert by_number[1].state.name == optuna_state
    assert "runnerd" not in by_number[1].user_attrs  # Optuna ended it: the hook left it
    recorded = note(second)
    assert (recorded["state"], recorded["params"]) == (optuna_state, by_number[1].params)
    first = note(runs["trial=0"])
    assert first["value"] == pytest.approx(by_number[0].value)


@pytest.mark.parametrize(
    ("sig", "state", "failure_class"),
    [
        (signal.SIGKILL, "failed_crash", "ProcessExited"),
        (signal.SIGTERM, "failed_abandoned", "Terminated"),
    ],
)
def test_a_killed_trial_is_failed_in_optunas_storage(
    hooked: Daemon, sig: signal.Signals, state: str, failure_class: str
) -> None:
    name = f"study-{sig.name}"
    proc = study(hooked, name, "wait")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), proc.stderr.read() if proc.stderr else ""
    os.kill(int(line.split()[1]), sig)
    proc.communicate(timeout=60)
    assert {t.number: t.state.name for t in trials(hooked, name)}[1] in ("RUNNING", "FAIL")
    run = wait_for(
        lambda: (r := runs_of(hooked, name)["trial=1"])["state"] != "running" and r,
        what="the trial's run to end",
    )
    assert run["state"] == state
    assert run["failure"]["failure_class"] == failure_class
    wait_for(
        lambda: {t.number: t.state.name for t in trials(hooked, name)}[1] == "FAIL",
        timeout=60,
        what="the hook to fail the trial in Optuna's storage",
    )
    dead = {t.number: t for t in trials(hooked, name)}[1]
    assert dead.user_attrs["runnerd"] == {
        "run_id": run["run_id"],
        "state": state,
        "failure_class": failure_class,
    }


def test_the_hook_finds_the_password_it_was_given_and_leaves_other_runs() -> None:
    from runnerd_client.optuna import hide_password

    assert (
        hide_password("postgresql://me:s3cret@db:5432/optuna")
        == "postgresql://me:***@db:5432/optuna"
    )
    assert hide_password("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    unrelated = {
        "hook": "optuna",
        "event": {},
        "run": {"run_id": "X", "state": "failed_crash", "tags": {}, "pids": []},
    }
    result = subprocess.run(
        [sys.executable, "-m", "runnerd_client.optuna", "hook"],
        input=json.dumps(unrelated),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    streamed = subprocess.run(
        [sys.executable, "-m", "runnerd_client.optuna", "hook"],
        input=json.dumps({**unrelated, "event": {"seq": 3}}) + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, "RUNNERD_HOOK_MODE": "stream"},
        timeout=60,
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == '{"ok": true, "seq": 3}\n'


def test_a_stream_hook_never_creates_a_storage_before_an_event_needs_it(tmp_path: Path) -> None:
    """A stream hook warms up at the daemon's start; opening the user's new storage then
    would create its tables and race the user's own `create_study`."""
    db = tmp_path / "new.db"
    unrelated = {"hook": "optuna", "event": {"seq": 1}, "run": {"run_id": "X", "tags": {}}}
    streamed = subprocess.run(
        [sys.executable, "-m", "runnerd_client.optuna", "hook", "--storage", f"sqlite:///{db}"],
        input=json.dumps(unrelated) + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, "RUNNERD_HOOK_MODE": "stream"},
        timeout=60,
    )
    assert streamed.stdout == '{"ok": true, "seq": 1}\n', streamed.stderr
    assert not db.exists()
