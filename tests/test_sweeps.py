"""`runnerctl sweep` end to end: real daemon, real runnerctl, real commands, real signals.

Every cell runs CELL, a small script told what to do by files in its state folder:
`sleep` (seconds), `hold-<cell>` (wait while it exists), `fail-<cell>` or `fail-all`
(raise ValueError, or KeyError when $MODE is "key"); it appends "start <cell>" and,
when it succeeds, "end <cell>" to `log`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for
from runnerd_client.connection import Connection
from runnerd_client.protocol import ListRuns

CELL = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    state, name = Path(sys.argv[1]), "-".join(sys.argv[2:])
    with open(state / "log", "a") as log:
        log.write(f"start {name}\\n")
    sleep = state / "sleep"
    time.sleep(float(sleep.read_text()) if sleep.exists() else 0.0)
    deadline = time.monotonic() + 60
    while (state / f"hold-{name}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if (state / f"fail-{name}").exists() or (state / "fail-all").exists():
        if os.environ.get("MODE") == "key":
            raise KeyError(name)
        raise ValueError(f"cell {name} was told to fail")
    with open(state / "log", "a") as log:
        log.write(f"end {name}\\n")
""")
LIVE = ("pending", "running")


class Cells:
    """The cell script, its state folder, and the command template that runs it."""

    def __init__(self, root: Path, sleep: float = 0.0, fail: tuple[str, ...] = ()) -> None:
        self.state = root / "cells"
        self.state.mkdir()
        self.script = root / "cell.py"
        self.script.write_text(CELL)
        if sleep:
            (self.state / "sleep").write_text(str(sleep))
        for name in fail:
            self.fail(name)

    def command(self, *placeholders: str) -> list[str]:
        return [
            sys.executable,
            str(self.script),
            str(self.state),
            *(f"{{{p}}}" for p in placeholders),
        ]

    def fail(self, name: str) -> None:
        (self.state / f"fail-{name}").touch()

    def heal(self, name: str) -> None:
        (self.state / f"fail-{name}").unlink()

    def log(self) -> list[str]:
        path = self.state / "log"
        return path.read_text().splitlines() if path.exists() else []

    def ends(self) -> Counter[str]:
        return Counter(line.split()[1] for line in self.log() if line.startswith("end "))

    def starts(self) -> Counter[str]:
        return Counter(line.split()[1] for line in self.log() if line.startswith("start "))


def cell_processes(cells: Cells) -> list[int]:
    """The pids of the processes running the cell script now."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(cells.script).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def runnerctl(
    daemon: Daemon, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runnerd.cli", *args],
        env={**daemon.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def spawn(daemon: Daemon, procs: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runnerd.cli", *args],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def sweep_id_of(output: str) -> str:
    found = re.search(r"^sweep (\S+): \d+ cell\(s\)", output, re.M)
    assert found, output
    return found.group(1)


def manifest_path_of(output: str) -> Path:
    found = re.search(r"; manifest (\S+)$", output, re.M)
    assert found, output
    return Path(found.group(1))


def started_sweep(daemon: Daemon, experiment: str) -> str:
    """The sweep a `sweep run` just created (it is running in the background)."""
    found = wait_for(
        lambda: [
            s["sweep_id"] for s in daemon.ctl_json("sweep", "list") if s["experiment"] == experiment
        ],
        what=f"the sweep of {experiment} to be created",
    )
    return str(found[0])


def show(daemon: Daemon, sweep_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = daemon.ctl_json("sweep", "show", sweep_id)
    return shown


def sweep_runs(daemon: Daemon, sweep_id: str, state: str | None = None) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = daemon.ctl_json(
        "list", "--sweep", sweep_id, "--limit", "10000", *(("--state", state) if state else ())
    )
    return runs


def by_params(shown: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cells of `sweep show --json` by their variation."""
    return {c["variation"]: c for c in shown["cells"]}


class Watch(threading.Thread):
    """Polls the daemon's record of a sweep's runs while it runs: the most runs live at
    once, and any cell with two live attempts at once."""

    def __init__(self, daemon: Daemon, sweep_id: str) -> None:
        super().__init__(daemon=True)
        self.conn = Connection(daemon.socket)
        self.sweep_id = sweep_id
        self.done = threading.Event()
        self.most_live = 0
        self.twice: dict[int, list[str]] = {}
        self.samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                runs = self.conn.call(ListRuns(sweep=self.sweep_id, limit=10_000))["runs"]
                live = [r for r in runs if r["state"] in LIVE]
                self.most_live = max(self.most_live, len(live))
                for cell, n in Counter(r["cell"] for r in live).items():
                    if n > 1:
                        self.twice[cell] = [r["run_id"] for r in live if r["cell"] == cell]
                self.samples += 1
                time.sleep(0.005)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> Watch:
        self.done.set()
        self.join(10)
        self.conn.close()
        if self.error is not None:
            raise self.error
        return self


GRID = ("--grid", "x=0,1,2", "--grid", "y=0,1,2,3")
BROKEN = ("1-2", "2-0")  # cells 6 and 8 of the grid


def test_continue_on_failure_runs_every_cell_at_most_jobs_at_once(
    daemon: Daemon, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    cells = Cells(short_tmp, sleep=0.3, fail=BROKEN)
    proc = spawn(
        daemon,
        procs,
        "sweep",
        "run",
        "--experiment",
        "grid",
        *GRID,
        "--failure-policy",
        "continue_on_failure",
        "--jobs",
        "3",
        "--",
        *cells.command("x", "y"),
    )
    watch = Watch(daemon, started_sweep(daemon, "grid"))
    watch.start()
    code, out, err = finish(proc)
    watch.stop()

    assert code == 1, err
    sweep_id = sweep_id_of(out)
    assert f"sweep {sweep_id} failed: 10 succeeded, 2 failed of 12" in out
    assert watch.samples > 10
    assert 2 <= watch.most_live <= 3
    assert not watch.twice
    assert cells.ends() == Counter(
        {f"{x}-{y}": 1 for x in range(3) for y in range(4) if f"{x}-{y}" not in BROKEN}
    )

    path = manifest_path_of(out)
    assert path == short_tmp / "data" / "runnerd" / "sweeps" / sweep_id / "manifest.json"
    manifest = json.loads(path.read_text())
    shown = show(daemon, sweep_id)
    for doc in (manifest, shown):
        assert doc["sweep_id"] == sweep_id
        assert doc["failure_policy"] == "continue_on_failure"
        assert doc["status"] == "failed"
        assert doc["ended_at"] is not None
        assert doc["cells_summary"] == {
            "total": 12,
            "succeeded": 10,
            "failed": 2,
            "abandoned": 0,
            "skipped": 0,
            "running": 0,
            "pending": 0,
        }
        assert [c["index"] for c in doc["cells"]] == list(range(12))
        for cell in doc["cells"]:
            name = f"{cell['params']['x']}-{cell['params']['y']}"
            assert cell["attempts"] == 1
            if name in BROKEN:
                assert cell["state"] == "failed"
                failure = cell["failure"]
                assert failure["failure_class"] == "ValueError"
                assert failure["message"] == f"cell {name} was told to fail"
                assert failure["traceback"].startswith("Traceback (most recent call last)")
                assert f"ValueError: cell {name} was told to fail" in failure["traceback"]
                assert failure["signature"]
            else:
                assert (cell["state"], cell["failure"]) == ("succeeded", None)
    assert manifest["cells"] == shown["cells"]
    runs = sweep_runs(daemon, sweep_id)
    assert sorted(r["run_id"] for r in runs) == sorted(c["run_id"] for c in shown["cells"])


def test_fail_fast_stops_at_the_first_failure_and_skips_the_rest(
    daemon: Daemon, short_tmp: Path
) -> None:
    cells = Cells(short_tmp, fail=BROKEN)
    result = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "fast",
        *GRID,
        "--failure-policy",
        "fail_fast",
        "--jobs",
        "1",
        "--",
        *cells.command("x", "y"),
    )

    assert result.returncode == 1, result.stderr
    assert "fail_fast: stopped at cell 6 (" in result.stderr
    assert "ValueError: cell 1-2 was told to fail" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert cells.starts() == Counter(
        {f"0-{y}": 1 for y in range(4)} | {"1-0": 1, "1-1": 1, "1-2": 1}
    )
    sweep_id = sweep_id_of(result.stdout)
    manifest = json.loads(manifest_path_of(result.stdout).read_text())
    assert manifest["status"] == "failed"
    assert manifest["cells_summary"] == {
        "total": 12,
        "succeeded": 6,
        "failed": 1,
        "abandoned": 0,
        "skipped": 5,
        "running": 0,
        "pending": 0,
    }
    states = [(c["index"], c["state"], c["attempts"]) for c in manifest["cells"]]
    assert states == [(i, "succeeded", 1) for i in range(6)] + [(6, "failed", 1)] + [
        (i, "skipped", 0) for i in range(7, 12)
    ]
    failed = manifest["cells"][6]["failure"]
    assert "ValueError: cell 1-2 was told to fail" in failed["traceback"]
    assert all(c["run_id"] is None for c in manifest["cells"][7:])
    assert show(daemon, sweep_id)["cells"] == manifest["cells"]
    assert len(sweep_runs(daemon, sweep_id)) == 7


def test_fail_fast_stops_the_running_cells_with_cause_fail_fast(
    daemon: Daemon, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    cells = Cells(short_tmp, fail=("1",))
    for name in ("0", "1"):  # cell 0 runs until stopped; cell 1 fails once both run
        (cells.state / f"hold-{name}").touch()
    proc = spawn(
        daemon,
        procs,
        "sweep",
        "run",
        "--experiment",
        "stops",
        "--grid",
        "x=0,1,2,3",
        "--jobs",
        "2",
        "--",
        *cells.command("x"),
    )
    wait_for(
        lambda: cells.starts() == Counter({"0": 1, "1": 1}), timeout=30, what="cells 0 and 1 to run"
    )
    (cells.state / "hold-1").unlink()
    code, out, err = finish(proc)

    assert code == 1, err
    shown = show(daemon, sweep_id_of(out))
    assert [c["state"] for c in shown["cells"]] == ["abandoned", "failed", "skipped", "skipped"]
    stopped = shown["cells"][0]
    assert (stopped["failure"]["failure_class"], stopped["failure"]["message"]) == (
        "FailFast",
        "stopped by fail_fast: cell 1 failed",
    )
    run = daemon.ctl_json("show", stopped["run_id"])
    assert [t["cause"] for t in run["transitions"] if t["to"] == "failed_abandoned"] == [
        "fail_fast"
    ]
    assert not cell_processes(cells)
    assert not cells.ends()


def test_resume_after_the_driver_is_killed_runs_only_the_unfinished_cells(
    daemon: Daemon, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    cells = Cells(short_tmp, sleep=0.3)
    (cells.state / "hold-3").touch()  # cell 3 is surely running when the driver dies
    driver = spawn(
        daemon,
        procs,
        "sweep",
        "run",
        "--experiment",
        "killed",
        "--grid",
        "x=0,1,2,3,4,5,6,7",
        "--jobs",
        "2",
        "--",
        *cells.command("x"),
    )
    sweep_id = started_sweep(daemon, "killed")
    wait_for(
        lambda: cells.starts()["3"] and len(sweep_runs(daemon, sweep_id, "succeeded")) >= 2,
        timeout=30,
        what="two cells to succeed and cell 3 to start",
    )
    driver.send_signal(signal.SIGKILL)
    finish(driver)
    wait_for(
        lambda: not cell_processes(cells),
        timeout=5,
        what="the cells' commands to die with their driver",
    )
    wait_for(
        lambda: not [r for r in sweep_runs(daemon, sweep_id) if r["state"] in LIVE],
        timeout=30,
        what="the killed driver's runs to end",
    )
    ended_before = cells.ends()
    (cells.state / "hold-3").unlink()

    before = show(daemon, sweep_id)
    assert before["status"] == "interrupted"
    done = {c["variation"] for c in before["cells"] if c["state"] == "succeeded"}
    assert 2 <= len(done) < 8
    assert "x=3" not in done
    for cell in before["cells"]:
        if cell["state"] == "failed":  # cut short by the kill: cell 3, maybe another
            assert cell["failure"]["failure_class"] == "ProcessExited"
            assert cell["attempts"] == 1
        else:
            assert (cell["state"], cell["attempts"]) in {("succeeded", 1), ("pending", 0)}
    assert by_params(before)["x=3"]["state"] == "failed"

    result = runnerctl(daemon, "sweep", "resume", sweep_id)
    assert result.returncode == 0, result.stderr
    assert f"sweep {sweep_id}: {8 - len(done)} cell(s) of killed" in result.stdout

    after = show(daemon, sweep_id)
    assert after["status"] == "succeeded"
    assert after["cells_summary"]["succeeded"] == 8
    old, new = by_params(before), by_params(after)
    for name, cell in new.items():
        assert cell["state"] == "succeeded"
        if name in done:
            assert (cell["run_id"], cell["attempts"]) == (old[name]["run_id"], 1)
        else:
            assert cell["run_id"] != old[name]["run_id"]
            assert cell["attempts"] == old[name]["attempts"] + 1
    assert cells.ends() - ended_before == Counter(
        {name.removeprefix("x="): 1 for name in new if name not in done}
    )
    manifest = json.loads(manifest_path_of(result.stdout).read_text())
    assert manifest["cells"] == after["cells"]
    assert manifest["cells_summary"] == after["cells_summary"]
    assert sum(c["attempts"] for c in manifest["cells"]) == len(sweep_runs(daemon, sweep_id))


def test_driver_outlives_a_killed_daemon_and_resume_runs_what_did_not_succeed(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    first = Daemon(short_tmp).start()
    second: Daemon | None = None
    try:
        cells = Cells(short_tmp, sleep=0.3, fail=("5",))
        (cells.state / "hold-3").touch()  # cell 3 runs across the whole outage
        driver = spawn(
            first,
            procs,
            "sweep",
            "run",
            "--experiment",
            "outage",
            "--grid",
            "x=0,1,2,3,4,5,6,7",
            "--jobs",
            "2",
            "--failure-policy",
            "continue_on_failure",
            "--",
            *cells.command("x"),
        )
        sweep_id = started_sweep(first, "outage")
        wait_for(
            lambda: cells.starts()["3"] and len(sweep_runs(first, sweep_id, "succeeded")) >= 2,
            timeout=30,
            what="two cells to succeed and cell 3 to start",
        )
        first.stop(signal.SIGKILL)
        started = sum(cells.starts().values())
        wait_for(
            lambda: sum(cells.starts().values()) > started,
            timeout=30,
            what="a cell to start while runnerd is down",
        )
        (cells.state / "hold-3").unlink()
        wait_for(
            lambda: cells.ends()["3"], timeout=30, what="cell 3 to succeed while runnerd is down"
        )
        second = Daemon(short_tmp).start()
        code, out, err = finish(driver)

        assert code == 1, err
        assert "not recorded" not in err, err
        assert f"sweep {sweep_id} failed: 7 succeeded, 1 failed of 8" in out
        assert cells.ends() == Counter({str(x): 1 for x in range(8) if x != 5})
        before = show(second, sweep_id)
        assert before["status"] == "failed"
        assert before["ended_at"] is not None
        assert before["cells_summary"]["succeeded"] == 7
        assert [(c["index"], c["state"], c["attempts"]) for c in before["cells"]] == [
            (i, "failed" if i == 5 else "succeeded", 1) for i in range(8)
        ]

        cells.heal("5")
        result = runnerctl(second, "sweep", "resume", sweep_id)
        assert result.returncode == 0, result.stderr
        assert f"sweep {sweep_id}: 1 cell(s) of outage" in result.stdout
        after = show(second, sweep_id)
        assert after["status"] == "succeeded"
        for old, new in zip(before["cells"], after["cells"], strict=True):
            assert new["state"] == "succeeded"
            if old["index"] == 5:
                assert new["attempts"] == 2 and new["run_id"] != old["run_id"]
            else:
                assert (new["run_id"], new["attempts"]) == (old["run_id"], 1)
        manifest = json.loads(manifest_path_of(result.stdout).read_text())
        assert manifest["cells_summary"] == {
            "total": 8,
            "succeeded": 8,
            "failed": 0,
            "abandoned": 0,
            "skipped": 0,
            "running": 0,
            "pending": 0,
        }
        assert manifest["cells"] == after["cells"]
        assert len(sweep_runs(second, sweep_id)) == 9
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_two_resumes_at_once_never_run_a_cell_twice(
    daemon: Daemon, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    cells = Cells(short_tmp, sleep=0.3)
    (cells.state / "fail-all").touch()
    first = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "twice",
        "--grid",
        "x=0,1,2,3,4,5",
        "--jobs",
        "3",
        "--failure-policy",
        "continue_on_failure",
        "--",
        *cells.command("x"),
    )
    assert first.returncode == 1
    sweep_id = sweep_id_of(first.stdout)
    assert show(daemon, sweep_id)["cells_summary"]["failed"] == 6
    (cells.state / "fail-all").unlink()

    watch = Watch(daemon, sweep_id)
    watch.start()
    resumes = [spawn(daemon, procs, "sweep", "resume", sweep_id, "--jobs", "3") for _ in range(2)]
    outputs = [finish(proc) for proc in resumes]
    watch.stop()

    assert not watch.twice, f"cells with two live attempts: {watch.twice}"
    assert watch.most_live >= 1
    after = show(daemon, sweep_id)
    assert after["status"] == "succeeded"
    assert after["cells_summary"]["succeeded"] == 6
    assert [c["attempts"] for c in after["cells"]] == [2] * 6
    assert len(sweep_runs(daemon, sweep_id)) == 12
    assert cells.ends() == Counter({str(x): 1 for x in range(6)})
    said = Counter(
        m.groups()
        for _, out, _ in outputs
        for m in re.finditer(r"^cell (\d+) x=\d+: (\w+)", out, re.M)
    )
    for index in range(6):
        assert said[(str(index), "succeeded")] == 1, outputs
        assert said[(str(index), "succeeded")] + said[(str(index), "taken")] <= 2
    assert set(state for _, state in said) <= {"succeeded", "taken"}


def held_resumes(
    daemon: Daemon, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> tuple[Cells, str, subprocess.Popen[str], subprocess.CompletedProcess[str]]:
    """A sweep of two failed cells; a first resume holding both of them running, and a
    second resume of it run to its end meanwhile."""
    cells = Cells(short_tmp)
    (cells.state / "fail-all").touch()
    first = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "held",
        "--grid",
        "x=0,1",
        "--failure-policy",
        "continue_on_failure",
        "--",
        *cells.command("x"),
    )
    assert first.returncode == 1
    sweep_id = sweep_id_of(first.stdout)
    (cells.state / "fail-all").unlink()
    for name in ("0", "1"):
        (cells.state / f"hold-{name}").touch()
    holder = spawn(daemon, procs, "sweep", "resume", sweep_id, "--jobs", "2")
    wait_for(
        lambda: cells.starts() == Counter({"0": 2, "1": 2}),
        timeout=30,
        what="the first resume to run both cells",
    )
    second = runnerctl(daemon, "sweep", "resume", sweep_id)
    return cells, sweep_id, holder, second


def release(cells: Cells, holder: subprocess.Popen[str]) -> tuple[int, str, str]:
    for name in ("0", "1"):
        (cells.state / f"hold-{name}").unlink()
    return finish(holder)


def test_a_resume_whose_every_cell_another_resume_runs_runs_nothing_and_exits_0(
    daemon: Daemon, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    cells, sweep_id, holder, second = held_resumes(daemon, short_tmp, procs)
    try:
        said = sorted(re.findall(r"^cell (\d+) x=\d+: (\w+)", second.stdout, re.M))
        assert said == [("0", "taken"), ("1", "taken")], second.stdout
        assert "held by live attempt" in second.stdout
        assert len(sweep_runs(daemon, sweep_id)) == 4
        assert second.returncode == 0, second.stdout + second.stderr
    finally:
        code, out, err = release(cells, holder)
    assert code == 0, out + err
    assert cells.ends() == Counter({"0": 1, "1": 1})


def test_a_resume_ending_does_not_end_the_sweep_another_resume_still_runs(
    daemon: Daemon, short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    cells, sweep_id, holder, second = held_resumes(daemon, short_tmp, procs)
    try:
        meanwhile = show(daemon, sweep_id)
        listed = {s["sweep_id"]: s for s in daemon.ctl_json("sweep", "list")}[sweep_id]
        assert meanwhile["cells_summary"]["running"] == 2
        assert (meanwhile["status"], meanwhile["ended_at"]) == ("running", None), second.stdout
        assert listed["status"] == "running"
    finally:
        code, out, err = release(cells, holder)
    assert code == 0, out + err
    after = show(daemon, sweep_id)
    assert after["status"] == "succeeded"
    assert [(c["state"], c["attempts"]) for c in after["cells"]] == [("succeeded", 2)] * 2


def test_resume_refuses_a_changed_command_or_grid(daemon: Daemon, short_tmp: Path) -> None:
    cells = Cells(short_tmp, fail=("2",))
    command = cells.command("x")
    first = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "changed",
        "--grid",
        "x=1,2",
        "--failure-policy",
        "continue_on_failure",
        "--",
        *command,
    )
    assert first.returncode == 1
    sweep_id = sweep_id_of(first.stdout)
    runs = sorted(r["run_id"] for r in sweep_runs(daemon, sweep_id))
    assert len(runs) == 2
    cells.heal("2")

    other = runnerctl(
        daemon,
        "sweep",
        "resume",
        sweep_id,
        "--",
        sys.executable,
        str(short_tmp / "other.py"),
        "{x}",
    )
    assert other.returncode == 2
    assert "command:" in other.stderr and "other.py" in other.stderr
    assert "nothing was run" in other.stderr
    grid = runnerctl(daemon, "sweep", "resume", sweep_id, "--grid", "x=1,2,3")
    assert grid.returncode == 2
    assert "grid:" in grid.stderr
    assert '{"x": [1, 2]}' in grid.stderr and '{"x": [1, 2, 3]}' in grid.stderr
    assert sorted(r["run_id"] for r in sweep_runs(daemon, sweep_id)) == runs
    assert cells.starts() == Counter({"1": 1, "2": 1})

    same = runnerctl(daemon, "sweep", "resume", sweep_id, "--grid", "x=1,2", "--", *command)
    assert same.returncode == 0, same.stderr
    assert show(daemon, sweep_id)["cells_summary"]["succeeded"] == 2
    assert cells.starts() == Counter({"1": 1, "2": 2})


@pytest.mark.parametrize("named_before", [False, True], ids=["new", "recorded-keys-sorted"])
def test_cells_are_named_in_grid_order_and_resumed_whatever_the_order(
    daemon: Daemon, short_tmp: Path, named_before: bool
) -> None:
    """Cells are named in the order of the --grid options; a resume given the grid in
    another order, and (recorded-keys-sorted) a resume or replication of a sweep recorded
    when names had their keys sorted, keep the cells' recorded names, in their line per
    cell too."""
    cells = Cells(short_tmp, fail=("2-0.1",))
    command = cells.command("x", "lr")
    first = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "order",
        "--grid",
        "x=1,2",
        "--grid",
        "lr=0.1",
        "--failure-policy",
        "continue_on_failure",
        "--",
        *command,
    )
    assert first.returncode == 1, first.stderr
    sweep_id = sweep_id_of(first.stdout)
    assert re.search(r"^1\s+x=2,lr=0\.1\s+failed", first.stdout, re.M), first.stdout
    assert [c["variation"] for c in show(daemon, sweep_id)["cells"]] == ["x=1,lr=0.1", "x=2,lr=0.1"]
    names = ["x=1,lr=0.1", "x=2,lr=0.1"]
    if named_before:
        daemon.stop()
        daemon.as_named_before()
        daemon.start()
        names = ["lr=0.1,x=1", "lr=0.1,x=2"]
    cells.heal("2-0.1")

    again = runnerctl(
        daemon, "sweep", "resume", sweep_id, "--grid", "lr=0.1", "--grid", "x=1,2", "--", *command
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"cell 1 {names[1]}: succeeded run " in again.stdout, again.stdout
    shown = show(daemon, sweep_id)
    assert [(c["variation"], c["state"], c["attempts"]) for c in shown["cells"]] == [
        (names[0], "succeeded", 1),
        (names[1], "succeeded", 2),
    ]
    runs = sweep_runs(daemon, sweep_id)
    assert sorted((r["variation"], r["attempt"]) for r in runs) == [
        (names[0], 1),
        (names[1], 1),
        (names[1], 2),
    ]
    manifest = json.loads(manifest_path_of(again.stdout).read_text())
    assert [c["variation"] for c in manifest["cells"]] == names
    text = daemon.ctl("sweep", "show", sweep_id).stdout
    assert all(re.search(rf"^\d+\s+{re.escape(n)}\s+succeeded", text, re.M) for n in names), text
    same = runnerctl(daemon, "sweep", "replicate", sweep_id)
    assert same.returncode == 0, same.stdout + same.stderr
    assert replicated(same.stdout) == {0: "yes", 1: "yes"}
    assert all(f"cell {i} {n}: succeeded run " in same.stdout for i, n in enumerate(names)), (
        same.stdout
    )
    assert {r["variation"] for r in sweep_runs(daemon, sweep_id)} == set(names)


REPLICATION_ROW = re.compile(r"^(\d+)\s+(\S+)\s+.*\s(yes|NO)\s+(\S+)$", re.M)


def replicated(output: str) -> dict[int, str]:
    """CELL -> SAME of the replication table."""
    return {int(m.group(1)): m.group(3) for m in REPLICATION_ROW.finditer(output)}


def report_of(output: str) -> dict[str, Any]:
    found = re.search(r"; replication (\S+), report (\S+)$", output, re.M)
    assert found, output
    report: dict[str, Any] = json.loads(Path(found.group(2)).read_text())
    assert report["replication_id"] == found.group(1)
    return report


def test_replicate_checks_each_cell_ends_as_recorded(daemon: Daemon, short_tmp: Path) -> None:
    cells = Cells(short_tmp, fail=("2",))
    first = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "again",
        "--grid",
        "x=0,1,2,3",
        "--failure-policy",
        "continue_on_failure",
        "--jobs",
        "2",
        "--",
        *cells.command("x"),
    )
    assert first.returncode == 1
    sweep_id = sweep_id_of(first.stdout)
    manifest = manifest_path_of(first.stdout)
    recorded, written = show(daemon, sweep_id), manifest.read_text()

    same = runnerctl(daemon, "sweep", "replicate", sweep_id)
    assert same.returncode == 0, same.stdout + same.stderr
    assert replicated(same.stdout) == {0: "yes", 1: "yes", 2: "yes", 3: "yes"}
    assert "4 of 4 cell(s) ended as recorded" in same.stdout
    assert re.search(
        r"^2\s+x=2\s+failed ValueError \[\w+\]\s+failed ValueError \[\w+\]\s+yes", same.stdout, re.M
    ), same.stdout
    report = report_of(same.stdout)
    assert (report["sweep_id"], report["same"], report["differ"]) == (sweep_id, 4, 0)
    assert Path(manifest.parent, f"replication-{report['replication_id']}.json").exists()
    linked = sweep_runs(daemon, sweep_id)
    assert len(linked) == 8  # its attempts are linked to the sweep's cells...
    assert sorted(
        r["run_id"] for r in linked if r["tags"].get("replication") == report["replication_id"]
    ) == sorted(c["now"]["run_id"] for c in report["cells"])
    assert show(daemon, sweep_id) == recorded  # ...and claim none of them
    assert manifest.read_text() == written

    cells.fail("1")  # newly failing: the verdict says so, the sweep's record does not change
    changed = runnerctl(daemon, "sweep", "replicate", sweep_id)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert replicated(changed.stdout) == {0: "yes", 1: "NO", 2: "yes", 3: "yes"}
    assert "3 of 4 cell(s) ended as recorded" in changed.stdout
    verdict = report_of(changed.stdout)["cells"][1]
    assert (verdict["recorded"]["state"], verdict["now"]["state"]) == ("succeeded", "failed")
    assert show(daemon, sweep_id) == recorded

    cells.heal("1")  # compared with the sweep's record again, not with the last replication
    healed = runnerctl(daemon, "sweep", "replicate", sweep_id)
    assert replicated(healed.stdout) == {0: "yes", 1: "yes", 2: "yes", 3: "yes"}
    other = runnerctl(daemon, "sweep", "replicate", sweep_id, "--failed-only", env={"MODE": "key"})
    assert other.returncode == 1
    assert replicated(other.stdout) == {2: "NO"}
    assert re.search(
        r"^2\s+x=2\s+failed ValueError \[\w+\]\s+failed KeyError \[\w+\]\s+NO", other.stdout, re.M
    ), other.stdout
    after = show(daemon, sweep_id)
    assert after == recorded
    assert [c["attempts"] for c in after["cells"]] == [1, 1, 1, 1]
    assert len(sweep_runs(daemon, sweep_id)) == 4 + 4 + 4 + 4 + 1
    assert cells.starts() == Counter({"0": 4, "1": 4, "2": 5, "3": 4})


def test_the_attempts_column_is_the_manifests_attempts(daemon: Daemon, short_tmp: Path) -> None:
    """A variation run before (by an earlier sweep) has a run `attempt` of 2; the cell's
    `attempts` in this sweep is 1, and the table shows that one meaning."""
    cells = Cells(short_tmp, fail=("1",))
    args = (
        "sweep",
        "run",
        "--experiment",
        "att",
        "--grid",
        "x=0,1",
        "--failure-policy",
        "continue_on_failure",
        "--",
        *cells.command("x"),
    )
    runnerctl(daemon, *args)
    second = runnerctl(daemon, *args)

    manifest = json.loads(manifest_path_of(second.stdout).read_text())
    assert [c["attempts"] for c in manifest["cells"]] == [1, 1]
    assert {daemon.ctl_json("show", c["run_id"])["attempt"] for c in manifest["cells"]} == {2}
    header, *rows = [
        line.split() for line in second.stdout.splitlines() if re.match(r"^(CELL|\d+)\s", line)
    ]
    assert header[:4] == ["CELL", "VARIATION", "STATE", "ATTEMPTS"]
    assert [(row[0], row[3]) for row in rows] == [("0", "1"), ("1", "1")]


def test_a_placeholder_no_cell_has_is_refused(daemon: Daemon, short_tmp: Path) -> None:
    cells = Cells(short_tmp)
    result = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "typo",
        "--grid",
        "x=1,2",
        "--",
        *cells.command("x", "y"),
    )
    assert result.returncode == 2
    assert "the command uses y, which no cell has" in result.stderr
    assert runnerctl(daemon, "sweep", "list").stdout.strip() == "no sweeps"
    assert cells.log() == []


@pytest.mark.parametrize(
    "args",
    [
        ("sweep", "show", "NOPE"),
        ("sweep", "show", "NOPE", "--json"),
        ("sweep", "resume", "NOPE"),
        ("sweep", "replicate", "NOPE"),
    ],
)
def test_an_unknown_sweep_is_named(daemon: Daemon, args: tuple[str, ...]) -> None:
    result = runnerctl(daemon, *args)
    assert result.returncode != 0
    assert "no sweep" in result.stderr and "NOPE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_toml_file_of_cells_is_a_sweep(daemon: Daemon, short_tmp: Path) -> None:
    cells = Cells(short_tmp)
    grid = short_tmp / "cells.toml"
    grid.write_text('[[cells]]\nx = 1\nname = "a"\n\n[[cells]]\nx = 2\nname = "b"\n')
    result = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "toml",
        "--grid-file",
        str(grid),
        "--",
        *cells.command("x", "name"),
    )
    assert result.returncode == 0, result.stderr
    shown = show(daemon, sweep_id_of(result.stdout))
    assert [(c["params"], c["variation"], c["state"]) for c in shown["cells"]] == [
        ({"x": 1, "name": "a"}, "x=1,name=a", "succeeded"),
        ({"x": 2, "name": "b"}, "x=2,name=b", "succeeded"),
    ]
    assert shown["spec"]["cells"] == [{"x": 1, "name": "a"}, {"x": 2, "name": "b"}]
    assert cells.ends() == Counter({"1-a": 1, "2-b": 1})


def test_a_grid_value_that_is_json_is_taken_as_json(daemon: Daemon, short_tmp: Path) -> None:
    cells = Cells(short_tmp)
    result = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "json-grid",
        "--grid",
        'model=["ridge","lasso"]',
        "--grid",
        "alpha=0.1,1",
        "--grid",
        'note="a,b"',
        "--",
        *cells.command("model", "alpha"),
    )
    assert result.returncode == 0, result.stderr
    shown = show(daemon, sweep_id_of(result.stdout))
    assert [c["params"] for c in shown["cells"]] == [
        {"model": m, "alpha": a, "note": "a,b"} for m in ("ridge", "lasso") for a in (0.1, 1)
    ]
    assert cells.ends() == Counter({"ridge-0.1": 1, "ridge-1": 1, "lasso-0.1": 1, "lasso-1": 1})


@pytest.mark.parametrize("value", ['model=["ridge",lasso]', 'model=["ridge"', "x=1,,2"])
def test_an_ambiguous_grid_value_is_a_usage_error_before_any_cell_runs(
    daemon: Daemon, short_tmp: Path, value: str
) -> None:
    cells = Cells(short_tmp)
    result = runnerctl(
        daemon,
        "sweep",
        "run",
        "--experiment",
        "ambiguous",
        "--grid",
        value,
        "--",
        *cells.command(value.partition("=")[0]),
    )
    assert result.returncode == 2
    assert value in result.stderr and "Traceback" not in result.stderr
    assert runnerctl(daemon, "sweep", "list").stdout.strip() == "no sweeps"
    assert cells.log() == []


def test_a_malformed_grid_option_is_a_usage_error(daemon: Daemon, short_tmp: Path) -> None:
    cells = Cells(short_tmp)
    result = runnerctl(
        daemon, "sweep", "run", "--experiment", "bad", "--grid", "x", "--", *cells.command("x")
    )
    assert result.returncode == 2
    assert "'x' is not K=V1,V2" in result.stderr
    assert cells.log() == []


HOLDING = """
import os, sys, time
marker = os.path.join(sys.argv[1], f"hold-{sys.argv[2]}")
print("cell", sys.argv[2], "from", os.environ.get("RUNNERD_CHECKPOINT_DATA"), flush=True)
while os.path.exists(marker):
    time.sleep(0.05)
"""


def test_a_crash_mid_sweep_is_resumed_by_resume_interrupted(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    script = short_tmp / "hold.py"
    script.write_text(HOLDING)
    for cell in (1, 2):
        (short_tmp / f"hold-{cell}").write_text("")
    daemon = Daemon(short_tmp).start()
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "sweep",
            "run",
            "--experiment",
            "crashy",
            "--grid",
            "c=0,1,2,3",
            "--jobs",
            "2",
            "--failure-policy",
            "continue_on_failure",
            "--",
            sys.executable,
            str(script),
            str(short_tmp),
            "{c}",
        ],
        env=daemon.env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(driver)
    wait_for(
        lambda: (
            len(
                [
                    r
                    for r in daemon.ctl_json("list", "--experiment", "crashy")
                    if r["state"] == "running"
                ]
            )
            == 2
            and any(
                r["state"] == "succeeded" for r in daemon.ctl_json("list", "--experiment", "crashy")
            )
        ),
        timeout=30,
        what="cell 0 done and cells 1 and 2 held",
    )
    daemon.stop(signal.SIGKILL)  # the machine goes down: daemon, driver and cells at once
    driver.kill()
    driver.communicate(timeout=30)
    for cell in (1, 2):
        (short_tmp / f"hold-{cell}").unlink()
    daemon.as_if_rebooted()
    daemon = Daemon(short_tmp).start()
    try:
        sweep = daemon.ctl_json("sweep", "list")[0]
        assert sweep["status"] == "interrupted"
        states = {
            c["index"]: c["state"]
            for c in daemon.ctl_json("sweep", "show", sweep["sweep_id"])["cells"]
        }
        assert states == {0: "succeeded", 1: "abandoned", 2: "abandoned", 3: "pending"}
        assert daemon.ctl_json("resume", "--interrupted", "--dry-run") == {
            "runs": [],
            "sweeps": [sweep["sweep_id"]],
            "not_launched": [],
        }
        done = daemon.ctl("resume", "--interrupted")
        assert f"sweep {sweep['sweep_id']} succeeded" in done.stdout, done.stdout
        cells = daemon.ctl_json("sweep", "show", sweep["sweep_id"])["cells"]
        assert [c["attempts"] for c in cells] == [1, 2, 2, 1]
        assert {c["state"] for c in cells} == {"succeeded"}
    finally:
        daemon.stop()


def test_follow_sweep_prints_its_runs_events_from_the_start(daemon: Daemon) -> None:
    result = daemon.ctl(
        "sweep", "run", "--experiment", "followed-sweep", "--grid", "n=1,2", "--", "true"
    )
    sweep_id = result.stdout.split()[1].rstrip(":")
    other = daemon.ctl("exec", "--experiment", "not-in-it", "--", "true")
    assert other.returncode == 0
    follow = subprocess.Popen(
        [sys.executable, "-m", "runnerd.cli", "follow", "--sweep", sweep_id[:10], "--json"],
        env=daemon.env,
        text=True,
        stdout=subprocess.PIPE,
    )
    try:
        assert follow.stdout is not None
        events = [json.loads(follow.stdout.readline()) for _ in range(6)]
    finally:
        follow.kill()
        follow.communicate(timeout=30)
    assert {e["sweep_id"] for e in events} == {sweep_id}
    assert [e["to"] for e in events if e["event"] == "transition"][:3] == [
        "pending",
        "running",
        "succeeded",
    ]
