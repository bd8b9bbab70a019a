"""`rd.sweep` and `rd.resume_sweep` end to end: a real daemon, real client processes.

Each scenario is a script run as a user would run it; the cells talk to the daemon from
the script's process (jobs=1) or from its forked workers (jobs>1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon

STOPS = """
import json, sys, time
from pathlib import Path
import runnerd_client as rd

state = Path(sys.argv[1])

def cell(i):
    (state / f"start-{i}").touch()
    if i == 0:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
        (state / "end-0").touch()
        return "slow"
    while not (state / "start-0").exists():
        time.sleep(0.01)
    time.sleep(0.5)
    raise ValueError(f"cell {i} diverged")

try:
    rd.sweep("stops", [{"i": 0}, {"i": 1}, {"i": 2}], cell, jobs=int(sys.argv[2]),
             failure_policy="fail_fast")
except Exception as exc:
    cause = exc.__cause__
    print(json.dumps({"raised": type(exc).__name__, "text": str(exc),
                      "cause": type(cause).__name__ if cause else None,
                      "sweep_id": getattr(exc, "sweep_id", None),
                      "index": getattr(getattr(exc, "cell", None), "index", None),
                      "manifest": str(getattr(exc, "manifest", None))}))
    sys.exit(1)
"""


def stops(daemon: Daemon, short_tmp: Path, jobs: int) -> tuple[dict[str, Any], Path]:
    """Run STOPS: cell 0 runs 10 s, cell 1 fails after 0.5 s (once cell 0 runs)."""
    state = short_tmp / "cells"
    state.mkdir()
    proc = daemon.python(STOPS, str(state), str(jobs))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    return json.loads(out), state


def transitions_into(daemon: Daemon, run_id: str, state: str) -> list[dict[str, Any]]:
    run = daemon.ctl_json("show", run_id)
    return [t for t in run["transitions"] if t["to"] == state]


def test_fail_fast_in_workers_stops_the_running_cells(daemon: Daemon, short_tmp: Path) -> None:
    raised, state = stops(daemon, short_tmp, jobs=2)

    assert not (state / "end-0").exists(), "cell 0 ran to its end"
    sweep = daemon.ctl_json("sweep", "list")[0]
    cells = daemon.ctl_json("sweep", "show", sweep["sweep_id"])["cells"]
    assert [(c["index"], c["state"]) for c in cells] == [
        (0, "abandoned"),
        (1, "failed"),
        (2, "skipped"),
    ]
    assert cells[0]["failure"]["failure_class"] == "FailFast"
    assert [
        t["cause"] for t in transitions_into(daemon, cells[0]["run_id"], "failed_abandoned")
    ] == ["fail_fast"]
    assert cells[1]["failure"]["failure_class"] == "ValueError"
    assert raised == {
        "raised": "SweepFailed",
        "cause": "ValueError",
        "index": 1,
        "sweep_id": sweep["sweep_id"],
        "manifest": sweep["manifest"],
        "text": f"sweep {sweep['sweep_id']} stopped by fail_fast: cell 1 (i=1)"
        f" failed: ValueError: cell 1 diverged;"
        f" manifest {sweep['manifest']}",
    }


FIRST_FAILS = """
import sys
from pathlib import Path
import runnerd_client as rd

def cell(i):
    (Path(sys.argv[1]) / f"start-{i}").touch()
    if i == 0:
        raise ValueError("cell 0 diverged")

try:
    rd.sweep("first-fails", [{"i": i} for i in range(3)], cell)
except rd.SweepFailed as exc:
    print(exc.cell.index, type(exc.__cause__).__name__)
"""


def test_fail_fast_in_process_starts_no_cell_after_the_failure(
    daemon: Daemon, short_tmp: Path
) -> None:
    proc = daemon.python(FIRST_FAILS, str(short_tmp))
    out, err = proc.communicate(timeout=60)

    assert out.split() == ["0", "ValueError"], err
    assert sorted(p.name for p in short_tmp.glob("start-*")) == ["start-0"]
    sweep = daemon.ctl_json("sweep", "list")[0]
    manifest = json.loads(Path(sweep["manifest"]).read_text())
    assert [(c["state"], c["attempts"]) for c in manifest["cells"]] == [
        ("failed", 1),
        ("skipped", 0),
        ("skipped", 0),
    ]


SWEEP = """
import json, sys
import runnerd_client as rd

def cell(x, fail=False):
    run = rd.current_run()
    assert run is not None and run.params == {"x": x, **({"fail": fail} if fail else {})}
    if fail:
        raise KeyError(f"cell {x} has no data")
    return x * x

cells = [{"x": i, **({"fail": True} if i in (4, 9, 15) else {})} for i in range(20)]
policy = sys.argv[1]
try:
    result = rd.sweep("pysweep", cells, cell, jobs=2, failure_policy=policy)
except rd.SweepFailed as exc:
    print(json.dumps({"raised": str(exc.__cause__), "cell": exc.cell.index,
                      "sweep_id": exc.sweep_id, "manifest": str(exc.manifest)}))
    sys.exit(1)
print(json.dumps({"sweep_id": result.sweep_id, "summary": result.summary,
                  "status": result.status, "manifest": str(result.manifest),
                  "outcomes": [[o.index, o.state, o.value, o.run_id, o.error]
                               for o in result.outcomes]}))
"""


def test_rd_sweep_outcomes_summary_and_manifest_agree(daemon: Daemon) -> None:
    proc = daemon.python(SWEEP, "continue_on_failure")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    outcomes = {o[0]: o for o in result["outcomes"]}
    assert sorted(i for i, o in outcomes.items() if o[1] == "failed") == [4, 9, 15]
    assert all(outcomes[i][2] == i * i for i in outcomes if i not in (4, 9, 15))
    assert result["summary"] == {
        "total": 20,
        "succeeded": 17,
        "failed": 3,
        "abandoned": 0,
        "skipped": 0,
        "running": 0,
        "pending": 0,
    }
    assert result["status"] == "failed"
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["cells_summary"] == result["summary"]
    for cell in manifest["cells"]:
        assert cell["run_id"] == outcomes[cell["index"]][3]
        assert cell["state"] == outcomes[cell["index"]][1]
        if cell["state"] == "failed":
            assert cell["failure"]["failure_class"] == "KeyError"
            assert "has no data" in cell["failure"]["traceback"]
    pids = {
        run["pids"][0]
        for run in daemon.ctl_json("list", "--sweep", result["sweep_id"])
        if run["pids"]
    }
    assert proc.pid not in pids  # jobs=2: the cells ran in worker processes


def test_rd_sweep_fail_fast_raises_sweep_failed_after_writing_the_manifest(daemon: Daemon) -> None:
    proc = daemon.python(SWEEP, "fail_fast")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    sweep = daemon.ctl_json("sweep", "list")[0]
    assert json.loads(out) == {
        "raised": "'cell 4 has no data'",
        "cell": 4,
        "sweep_id": sweep["sweep_id"],
        "manifest": sweep["manifest"],
    }
    manifest: dict[str, Any] = json.loads(Path(sweep["manifest"]).read_text())
    summary = manifest["cells_summary"]
    assert manifest["status"] == "failed"
    assert summary["failed"] == 1
    assert summary["skipped"] >= 10
    assert summary["running"] == summary["pending"] == 0
    assert summary["total"] == 20 == sum(v for k, v in summary.items() if k != "total")


RESUMABLE = """
import json, os, sys
import runnerd_client as rd

def cell(x):
    if os.path.exists(os.environ["BROKEN"]) and x % 3 == 0:
        raise OSError(f"disk for {x} unavailable")
    return x

if sys.argv[1] == "run":
    rd.sweep("resumable", [{"x": i} for i in range(9)], cell,
             failure_policy="continue_on_failure")
else:
    result = rd.resume_sweep(sys.argv[2], cell)
    print(json.dumps({"ran": [o.index for o in result.outcomes], "status": result.status}))
"""


def test_rd_resume_sweep_runs_only_what_did_not_succeed(daemon: Daemon, short_tmp: Path) -> None:
    broken = short_tmp / "broken"
    broken.write_text("")
    env = {"BROKEN": str(broken)}
    first = daemon.python(RESUMABLE, "run", env=env)
    first.communicate(timeout=120)
    sweep_id = daemon.ctl_json("sweep", "list")[0]["sweep_id"]
    broken.unlink()
    second = daemon.python(RESUMABLE, "resume", sweep_id, env=env)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert json.loads(out) == {"ran": [0, 3, 6], "status": "succeeded"}
    cells = daemon.ctl_json("sweep", "show", sweep_id)["cells"]
    assert [c["attempts"] for c in cells] == [2, 1, 1, 2, 1, 1, 2, 1, 1]
    assert {c["state"] for c in cells} == {"succeeded"}


ORDERED = """
import json, os, sys
import runnerd_client as rd

def cell(x, lr):
    if os.path.exists(os.environ["BROKEN"]) and x == 1:
        raise OSError("disk unavailable")
    return rd.current_run().variation

if sys.argv[1] == "run":
    result = rd.sweep("ordered", [{"x": 0, "lr": 0.1}, {"x": 1, "lr": 0.1}], cell,
                      failure_policy="continue_on_failure")
else:
    result = rd.resume_sweep(sys.argv[2], cell)
print(json.dumps({"sweep_id": result.sweep_id, "names": [o.variation for o in result.outcomes],
                  "inside": [o.value for o in result.outcomes if o.state == "succeeded"]}))
"""


@pytest.mark.parametrize("named_before", [False, True], ids=["new", "recorded-keys-sorted"])
def test_cells_are_named_in_the_order_given_and_a_resume_keeps_the_recorded_names(
    daemon: Daemon, short_tmp: Path, named_before: bool
) -> None:
    """Each cell's keys in the order the dict has them; a sweep recorded when names had
    their keys sorted resumes under those names (`rd.current_run().variation` inside the
    cell too), its cells' attempts counting on."""
    broken = short_tmp / "broken"
    broken.write_text("")
    env = {"BROKEN": str(broken)}
    first = daemon.python(ORDERED, "run", env=env)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    ran = json.loads(out)
    assert ran["names"] == ["x=0,lr=0.1", "x=1,lr=0.1"]
    assert ran["inside"] == ["x=0,lr=0.1"]
    names = ran["names"]
    if named_before:
        daemon.stop()
        daemon.as_named_before()
        daemon.start()
        names = ["lr=0.1,x=0", "lr=0.1,x=1"]
    broken.unlink()
    second = daemon.python(ORDERED, "resume", ran["sweep_id"], env=env)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    resumed = json.loads(out)
    assert (resumed["names"], resumed["inside"]) == (names[1:], names[1:])
    cells = daemon.ctl_json("sweep", "show", ran["sweep_id"])["cells"]
    assert [(c["variation"], c["attempts"], c["state"]) for c in cells] == [
        (names[0], 1, "succeeded"),
        (names[1], 2, "succeeded"),
    ]
    runs = daemon.ctl_json("list", "--experiment", "ordered")
    assert sorted((r["variation"], r["attempt"]) for r in runs) == [
        (names[0], 1),
        (names[1], 1),
        (names[1], 2),
    ]
