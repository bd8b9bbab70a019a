"""Resuming work: checkpoint resume, interrupted runs after a crash, and `rd.sweep`.

Real daemons, real client processes and real SIGKILLs throughout.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for

TRAIN = """
import json, sys, time
import runnerd_client as rd

lr = float(sys.argv[1])
try:
    run = rd.run("train", "main", params={"lr": lr}, resume=True, heartbeat_interval=0.2)
except rd.RunnerdError as exc:
    print("refused", exc.code, exc.message, flush=True)
    sys.exit(3)
with run:
    first = 1
    if run.resume_checkpoint:
        first = run.resume_checkpoint["data"]["epoch"] + 1
        print("resumed", run.resumed_from, run.resume_checkpoint["data"]["epoch"], flush=True)
    for epoch in range(first, 6):
        path = run.run_dir / f"epoch{epoch}.ckpt"
        path.write_text(str(epoch))
        run.checkpoint({"epoch": epoch}, path=path).flush()
        print("epoch", epoch, flush=True)
        if sys.argv[2:] == ["slow"] and epoch == 3:
            time.sleep(60)
print("done", run.run_id, flush=True)
"""


def lines_until(proc: subprocess.Popen[str], wanted: str) -> list[str]:
    """Read the process's stdout up to and including the line `wanted`."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if line.strip() == wanted:
            return seen
    raise AssertionError(f"{wanted!r} never came; got {seen}")


def test_a_killed_run_resumes_from_its_last_checkpoint(
        daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    first = daemon.python(TRAIN, "0.1", "slow")
    procs.append(first)
    lines_until(first, "epoch 3")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    killed = wait_for(lambda: next((r for r in daemon.ctl_json("list", "--experiment", "train")
                                    if r["state"] == "failed_crash"), None),
                      what="the killed run to be failed_crash")

    out, err = daemon.python(TRAIN, "0.1").communicate(timeout=60)
    assert f"resumed {killed['run_id']} 3" in out, err
    assert [line for line in out.splitlines() if line.startswith("epoch")] == \
        ["epoch 4", "epoch 5"]
    second = daemon.ctl_json("show", out.split()[-1])
    assert second["state"] == "succeeded"
    assert second["resumed_from"] == killed["run_id"]
    assert second["attempt"] == killed["attempt"] + 1

    changed = daemon.python(TRAIN, "0.5")
    out, _ = changed.communicate(timeout=60)
    assert changed.returncode == 0  # the last attempt succeeded: nothing to resume
    assert "resumed" not in out


def test_a_resume_with_changed_params_is_refused_naming_them(
        daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    first = daemon.python(TRAIN, "0.1", "slow")
    procs.append(first)
    lines_until(first, "epoch 3")
    first.kill()
    first.communicate(timeout=30)
    wait_for(lambda: daemon.ctl_json("list", "--state", "failed_crash"), what="the crash")
    changed = daemon.python(TRAIN, "0.5")
    out, _ = changed.communicate(timeout=60)
    assert changed.returncode == 3
    assert out.startswith("refused conflict")
    assert "params changed: lr" in out
    assert len(daemon.ctl_json("list", "--experiment", "train")) == 1


EPOCHS = """
import json, os, sys, time
import runnerd_client as rd
start = json.loads(os.environ.get("RUNNERD_CHECKPOINT_DATA") or "null")
path = os.environ.get("RUNNERD_CHECKPOINT") or ""
first = 1 if start is None else start["epoch"] + 1
print("start", first, open(path).read() if path else "-", flush=True)
run = rd.current_run()
for epoch in range(first, 4):
    ckpt = run.run_dir / f"e{epoch}"
    ckpt.write_text(f"weights{epoch}")
    run.checkpoint({"epoch": epoch}, path=ckpt).flush()
    print("epoch", epoch, flush=True)
    if os.environ.get("HANG_AT") == str(epoch):
        time.sleep(120)
"""


def launch(daemon: Daemon, name: str, *extra: str, hang_at: str = "2") -> subprocess.Popen[str]:
    script = daemon.root / "epochs.py"
    script.write_text(EPOCHS)
    return subprocess.Popen(
        [sys.executable, "-m", "runnerd.cli", "exec", "--experiment", name, *extra, "--",
         sys.executable, str(script)], env={**daemon.env, "HANG_AT": hang_at}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_machine_crash_leaves_exactly_its_runs_interrupted_and_resume_relaunches_them(
        short_tmp: Path, procs: list[subprocess.Popen[str]]) -> None:
    daemon = Daemon(short_tmp).start()
    ok = daemon.ctl("exec", "--experiment", "fine", "--", "true")
    assert ok.returncode == 0
    daemon.ctl("exec", "--experiment", "own-crash", "--", "false", check=False)
    hanging = [launch(daemon, f"job{i}") for i in range(3)]
    procs.extend(hanging)
    for proc in hanging:
        lines_until(proc, "epoch 2")
    daemon.stop(signal.SIGKILL)  # the machine goes down: the daemon and the runs at once
    for proc in hanging:
        proc.kill()
        proc.communicate(timeout=30)
    daemon.as_if_rebooted()

    daemon = Daemon(short_tmp).start()
    try:
        interrupted = [r for r in daemon.ctl_json("list", "--limit", "100")
                       if (r["failure"] or {}).get("failure_class") == "Interrupted"]
        assert sorted(r["experiment"] for r in interrupted) == ["job0", "job1", "job2"]
        assert {r["state"] for r in interrupted} == {"failed_abandoned"}
        plan = daemon.ctl_json("resume", "--interrupted", "--dry-run")
        assert sorted(plan["runs"]) == sorted(r["run_id"] for r in interrupted)
        dry = daemon.ctl("resume", "--interrupted", "--dry-run")
        assert dry.stdout.count("relaunch") == 3
        assert len(daemon.ctl_json("list", "--limit", "100")) == 5  # nothing ran

        done = daemon.ctl("resume", "--interrupted")
        assert done.stdout.count(": succeeded") == 3, done.stdout + done.stderr
        runs = daemon.ctl_json("list", "--limit", "100")
        for old in interrupted:
            new = next(r for r in runs if r["resumed_from"] == old["run_id"])
            assert new["state"] == "succeeded"
            assert new["experiment"] == old["experiment"]
            stdout = Path(new["run_dir"], "stdout.log").read_text()
            assert stdout.startswith("start 3 weights2"), stdout
        assert daemon.ctl_json("resume", "--interrupted", "--dry-run")["runs"] == []
    finally:
        daemon.stop()


def test_the_daemon_resumes_interrupted_runs_itself_when_configured(
        short_tmp: Path, procs: list[subprocess.Popen[str]]) -> None:
    daemon = Daemon(short_tmp).start()
    hanging = launch(daemon, "auto")
    procs.append(hanging)
    lines_until(hanging, "epoch 2")
    daemon.stop(signal.SIGKILL)
    hanging.kill()
    hanging.communicate(timeout=30)
    daemon.as_if_rebooted()
    config = short_tmp / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("resume_interrupted = true\n")
    daemon = Daemon(short_tmp).start()
    try:
        resumed = wait_for(lambda: [r for r in daemon.ctl_json("list") if r["resumed_from"]
                                    and r["state"] == "succeeded"], timeout=30,
                           what="the interrupted run to be relaunched and succeed")
        assert len(resumed) == 1
        assert resumed[0]["experiment"] == "auto"
    finally:
        daemon.stop()


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
except KeyError as exc:
    print(json.dumps({"raised": str(exc)}))
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
    assert result["summary"] == {"total": 20, "succeeded": 17, "failed": 3, "abandoned": 0,
                                 "skipped": 0, "running": 0, "pending": 0}
    assert result["status"] == "failed"
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["cells_summary"] == result["summary"]
    for cell in manifest["cells"]:
        assert cell["run_id"] == outcomes[cell["index"]][3]
        assert cell["state"] == outcomes[cell["index"]][1]
        if cell["state"] == "failed":
            assert cell["failure"]["failure_class"] == "KeyError"
            assert "has no data" in cell["failure"]["traceback"]
    pids = {run["pids"][0] for run in daemon.ctl_json("list", "--sweep", result["sweep_id"])
            if run["pids"]}
    assert proc.pid not in pids  # jobs=2: the cells ran in worker processes


def test_rd_sweep_fail_fast_raises_after_writing_the_manifest(daemon: Daemon) -> None:
    proc = daemon.python(SWEEP, "fail_fast")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert json.loads(out) == {"raised": "'cell 4 has no data'"}
    sweep = daemon.ctl_json("sweep", "list")[0]
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


HOLDING = """
import os, sys, time
marker = os.path.join(sys.argv[1], f"hold-{sys.argv[2]}")
print("cell", sys.argv[2], "from", os.environ.get("RUNNERD_CHECKPOINT_DATA"), flush=True)
while os.path.exists(marker):
    time.sleep(0.05)
"""


def test_a_crash_mid_sweep_is_resumed_by_resume_interrupted(
        short_tmp: Path, procs: list[subprocess.Popen[str]]) -> None:
    script = short_tmp / "hold.py"
    script.write_text(HOLDING)
    for cell in (1, 2):
        (short_tmp / f"hold-{cell}").write_text("")
    daemon = Daemon(short_tmp).start()
    driver = subprocess.Popen(
        [sys.executable, "-m", "runnerd.cli", "sweep", "run", "--experiment", "crashy",
         "--grid", "c=0,1,2,3", "--jobs", "2", "--failure-policy", "continue_on_failure",
         "--", sys.executable, str(script), str(short_tmp), "{c}"],
        env=daemon.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(driver)
    wait_for(lambda: len([r for r in daemon.ctl_json("list", "--experiment", "crashy")
                          if r["state"] == "running"]) == 2 and
             any(r["state"] == "succeeded" for r in daemon.ctl_json(
                 "list", "--experiment", "crashy")), timeout=30,
             what="cell 0 done and cells 1 and 2 held")
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
        states = {c["index"]: c["state"] for c in
                  daemon.ctl_json("sweep", "show", sweep["sweep_id"])["cells"]}
        assert states == {0: "succeeded", 1: "abandoned", 2: "abandoned", 3: "pending"}
        assert daemon.ctl_json("resume", "--interrupted", "--dry-run") == \
            {"runs": [], "sweeps": [sweep["sweep_id"]], "not_launched": []}
        done = daemon.ctl("resume", "--interrupted")
        assert f"sweep {sweep['sweep_id']} succeeded" in done.stdout, done.stdout
        cells = daemon.ctl_json("sweep", "show", sweep["sweep_id"])["cells"]
        assert [c["attempts"] for c in cells] == [1, 2, 2, 1]
        assert {c["state"] for c in cells} == {"succeeded"}
    finally:
        daemon.stop()


def test_follow_sweep_prints_its_runs_events_from_the_start(daemon: Daemon) -> None:
    result = daemon.ctl("sweep", "run", "--experiment", "followed-sweep", "--grid",
                        "n=1,2", "--", "true")
    sweep_id = result.stdout.split()[1].rstrip(":")
    other = daemon.ctl("exec", "--experiment", "not-in-it", "--", "true")
    assert other.returncode == 0
    follow = subprocess.Popen([sys.executable, "-m", "runnerd.cli", "follow", "--sweep",
                               sweep_id[:10], "--json"], env=daemon.env, text=True,
                              stdout=subprocess.PIPE)
    try:
        assert follow.stdout is not None
        events = [json.loads(follow.stdout.readline()) for _ in range(6)]
    finally:
        follow.kill()
        follow.communicate(timeout=30)
    assert {e["sweep_id"] for e in events} == {sweep_id}
    assert [e["to"] for e in events if e["event"] == "transition"][:3] == \
        ["pending", "running", "succeeded"]
