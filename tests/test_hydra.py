"""Hydra jobs as runs: the callback under Hydra's own launcher, and `hydra/launcher=runnerd`
running a multirun as a sweep (fail_fast, continue_on_failure, resume). Real hydra-core, a
real app configured as the README says, a real daemon, real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for

pytest.importorskip("hydra", reason="hydra-core is not installed (pip install -e '.[test]')")

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
    x: 1
    lr: 0.01
    mode: ok
    hydra:
      callbacks:
        runnerd:
          _target_: runnerd_client.hydra.RunnerdCallback
"""

APP = """
    import os, time
    from pathlib import Path
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base=None, config_path="conf", config_name="config")
    def main(cfg):
        out = Path(HydraConfig.get().runtime.output_dir)
        if cfg.x == 2 and cfg.mode == "raise" and not Path("fixed").exists():
            raise ValueError(f"x={cfg.x} diverged")
        if cfg.x == 2 and cfg.mode == "wait":
            print("ready", os.getpid(), flush=True)
            time.sleep(300)
        (out / "done.txt").write_text(str(cfg.x))
        return cfg.x

    if __name__ == "__main__":
        main()
"""


@pytest.fixture
def app(daemon: Daemon) -> Iterator[Path]:
    """The Hydra app's folder: app.py and conf/config.yaml (the callback configured)."""
    folder = daemon.root / "app"
    (folder / "conf").mkdir(parents=True)
    (folder / "conf" / "config.yaml").write_text(textwrap.dedent(CONFIG))
    (folder / "app.py").write_text(textwrap.dedent(APP))
    yield folder


def multirun(daemon: Daemon, app: Path, name: str, *overrides: str) -> subprocess.Popen[str]:
    # An editable install hides hydra_plugins from Hydra's plugin scan; an installed
    # package does not need this.
    env = {
        **daemon.env,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "app.py",
            "--multirun",
            f"hydra.job.name={name}",
            f"hydra.sweep.dir={app / name}",
            *overrides,
        ],
        cwd=app,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finished(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def runs(daemon: Daemon, name: str) -> dict[str, dict[str, Any]]:
    """The experiment's runs by variation (the latest attempt of each)."""
    found: dict[str, dict[str, Any]] = {}
    for run in reversed(daemon.ctl_json("list", "--experiment", name)):
        found[run["variation"]] = daemon.ctl_json("show", run["run_id"])
    return found


def the_sweep(daemon: Daemon, name: str) -> dict[str, Any]:
    (listed,) = [s for s in daemon.ctl_json("sweep", "list") if s["experiment"] == name]
    sweep: dict[str, Any] = daemon.ctl_json("sweep", "show", listed["sweep_id"])
    return sweep


def cell_states(sweep: dict[str, Any]) -> dict[str, str]:
    return {c["variation"]: c["state"] for c in sweep["cells"]}


def job_dirs(app: Path, name: str) -> list[str]:
    """Hydra's own record: the job folders (named by job number) it made."""
    return sorted(d.name for d in (app / name).iterdir() if (d / ".hydra").is_dir())


def test_the_callback_records_each_job_with_its_real_exception(daemon: Daemon, app: Path) -> None:
    code, err = finished(multirun(daemon, app, "cb-raise", "x=1,2,3", "mode=raise"))
    assert code == 1 and "x=2 diverged" in err
    found = runs(daemon, "cb-raise")
    assert sorted(found) == ["x=1,mode=raise", "x=2,mode=raise", "x=3,mode=raise"]
    failed = found["x=2,mode=raise"]
    assert failed["state"] == "failed_crash"
    assert failed["params"] == {"x": 2, "mode": "raise"}
    assert failed["failure"]["failure_class"] == "ValueError"
    assert failed["failure"]["message"] == "x=2 diverged"
    assert "app.py" in failed["failure"]["traceback"]
    assert failed["tags"]["hydra.job_num"] == 1
    assert [found[f"x={x},mode=raise"]["state"] for x in (1, 3)] == ["succeeded", "succeeded"]
    sweep = the_sweep(daemon, "cb-raise")
    assert cell_states(sweep) == {
        "x=1,mode=raise": "succeeded",
        "x=2,mode=raise": "failed",
        "x=3,mode=raise": "succeeded",
    }
    assert (app / "cb-raise" / "2" / "done.txt").read_text() == "3"  # Hydra went on


@pytest.mark.parametrize(
    ("sig", "state", "failure_class", "skipped"),
    [
        (signal.SIGTERM, "failed_abandoned", "Terminated", "skipped"),
        (signal.SIGKILL, "failed_crash", "ProcessExited", "pending"),
    ],
)
def test_a_killed_job_is_recorded_and_the_jobs_never_started_too(
    daemon: Daemon, app: Path, sig: signal.Signals, state: str, failure_class: str, skipped: str
) -> None:
    name = f"cb-{sig.name}"
    proc = multirun(daemon, app, name, "x=1,2,3", "mode=wait")
    assert proc.stdout is not None
    for line in proc.stdout:  # after Hydra's own log lines
        if line.startswith("ready"):
            break
    else:
        pytest.fail(f"the job never started: {finished(proc)}")
    os.kill(proc.pid, sig)
    code, _ = finished(proc)
    assert code == (143 if sig == signal.SIGTERM else -9)
    killed = wait_for(
        lambda: (r := runs(daemon, name)["x=2,mode=wait"])["state"] != "running" and r,
        what="the killed job's run to end",
    )
    assert (killed["state"], killed["failure"]["failure_class"]) == (state, failure_class)
    assert runs(daemon, name)["x=1,mode=wait"]["state"] == "succeeded"
    cells = cell_states(the_sweep(daemon, name))
    assert cells["x=3,mode=wait"] == skipped  # a SIGKILLed driver leaves it for a resume
    assert job_dirs(app, name) == ["0", "1"]  # Hydra's record stops there


@pytest.mark.parametrize("named_before", [False, True], ids=["new", "recorded-keys-sorted"])
def test_the_launcher_runs_a_multirun_as_a_sweep_fail_fast_then_resumes_it(
    daemon: Daemon, app: Path, named_before: bool
) -> None:
    """The resume gives the overrides in another order, and (recorded-keys-sorted) resumes
    a sweep recorded when cells were named with their keys sorted: both match its cells."""
    code, err = finished(
        multirun(daemon, app, "ln", "x=1,2,3", "mode=raise", "hydra/launcher=runnerd")
    )
    assert code == 1 and "stopped by fail_fast" in err and "x=2 diverged" in err
    sweep = the_sweep(daemon, "ln")
    assert cell_states(sweep) == {
        "x=1,mode=raise": "succeeded",
        "x=2,mode=raise": "failed",
        "x=3,mode=raise": "skipped",
    }
    manifest = json.loads((app / "ln" / "manifest.json").read_text())
    assert manifest["sweep_id"] == sweep["sweep_id"]
    failure = manifest["cells"][1]["failure"]
    assert (failure["failure_class"], failure["message"]) == ("ValueError", "x=2 diverged")
    name = "mode=raise,x={}" if named_before else "x={},mode=raise"
    if named_before:
        daemon.stop()
        daemon.as_named_before()
        daemon.start()
    first = runs(daemon, "ln")[name.format(1)]["run_id"]

    (app / "fixed").touch()
    code, err = finished(
        multirun(
            daemon,
            app,
            "ln-again",
            "mode=raise",
            "x=1,2,3",
            "hydra/launcher=runnerd",
            f"hydra.launcher.resume={sweep['sweep_id']}",
        )
    )
    assert code == 0, err
    resumed = the_sweep(daemon, "ln")
    assert {c["variation"]: (c["state"], c["attempts"]) for c in resumed["cells"]} == {
        name.format(1): ("succeeded", 1),
        name.format(2): ("succeeded", 2),
        name.format(3): ("succeeded", 1),
    }
    after = runs(daemon, "ln")
    assert sorted(after) == [name.format(x) for x in (1, 2, 3)]  # no run under another name
    assert after[name.format(1)]["run_id"] == first  # not run again
    assert after[name.format(2)]["attempt"] == 2  # the cell's attempts count on
    manifest = json.loads((app / "ln" / "manifest.json").read_text())
    assert [c["variation"] for c in manifest["cells"]] == [name.format(x) for x in (1, 2, 3)]
    # in the first multirun's folders, under their own job numbers
    assert [(app / "ln" / n / "done.txt").read_text() for n in "012"] == ["1", "2", "3"]
    assert not (app / "ln-again").exists() or not list((app / "ln-again").glob("*/done.txt"))


def test_the_launcher_continues_on_failure_when_told(daemon: Daemon, app: Path) -> None:
    code, err = finished(
        multirun(
            daemon,
            app,
            "ln-all",
            "x=1,2,3",
            "mode=raise",
            "hydra/launcher=runnerd",
            "hydra.launcher.failure_policy=continue_on_failure",
        )
    )
    assert code == 1 and "x=2 diverged" in err
    assert cell_states(the_sweep(daemon, "ln-all")) == {
        "x=1,mode=raise": "succeeded",
        "x=2,mode=raise": "failed",
        "x=3,mode=raise": "succeeded",
    }
    assert job_dirs(app, "ln-all") == ["0", "1", "2"]


def test_cells_are_named_in_the_order_the_overrides_were_written(daemon: Daemon, app: Path) -> None:
    code, err = finished(
        multirun(daemon, app, "order", "x=1,3", "lr=0.1", "hydra/launcher=runnerd")
    )
    assert code == 0, err
    names = ["x=1,lr=0.1", "x=3,lr=0.1"]
    sweep = the_sweep(daemon, "order")
    assert [c["variation"] for c in sweep["cells"]] == names
    assert [c["params"] for c in sweep["cells"]] == [{"x": 1, "lr": 0.1}, {"x": 3, "lr": 0.1}]
    shown = daemon.ctl("sweep", "show", sweep["sweep_id"]).stdout
    assert all(f" {name} " in shown for name in names), shown
    listed = daemon.ctl("list", "--experiment", "order").stdout
    assert all(name in listed for name in names), listed
    assert sorted(runs(daemon, "order")) == names
    manifest = json.loads((app / "order" / "manifest.json").read_text())
    assert [c["variation"] for c in manifest["cells"]] == names
