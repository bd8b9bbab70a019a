"""Resuming work: checkpoint resume and interrupted runs after a crash (sweeps: test_sweeps*).

Real daemons, real client processes and real SIGKILLs throughout.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

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
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
    first = daemon.python(TRAIN, "0.1", "slow")
    procs.append(first)
    lines_until(first, "epoch 3")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    killed = wait_for(
        lambda: next(
            (
                r
                for r in daemon.ctl_json("list", "--experiment", "train")
                if r["state"] == "failed_crash"
            ),
            None,
        ),
        what="the killed run to be failed_crash",
    )

    out, err = daemon.python(TRAIN, "0.1").communicate(timeout=60)
    assert f"resumed {killed['run_id']} 3" in out, err
    assert [line for line in out.splitlines() if line.startswith("epoch")] == ["epoch 4", "epoch 5"]
    second = daemon.ctl_json("show", out.split()[-1])
    assert second["state"] == "succeeded"
    assert second["resumed_from"] == killed["run_id"]
    assert second["attempt"] == killed["attempt"] + 1

    changed = daemon.python(TRAIN, "0.5")
    out, _ = changed.communicate(timeout=60)
    assert changed.returncode == 0  # the last attempt succeeded: nothing to resume
    assert "resumed" not in out


def test_a_resume_with_changed_params_is_refused_naming_them(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
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
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            name,
            *extra,
            "--",
            sys.executable,
            str(script),
        ],
        env={**daemon.env, "HANG_AT": hang_at},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_machine_crash_leaves_exactly_its_runs_interrupted_and_resume_relaunches_them(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
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
        interrupted = [
            r
            for r in daemon.ctl_json("list", "--limit", "100")
            if (r["failure"] or {}).get("failure_class") == "Interrupted"
        ]
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
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
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
        resumed = wait_for(
            lambda: [
                r
                for r in daemon.ctl_json("list")
                if r["resumed_from"] and r["state"] == "succeeded"
            ],
            timeout=30,
            what="the interrupted run to be relaunched and succeed",
        )
        assert len(resumed) == 1
        assert resumed[0]["experiment"] == "auto"
    finally:
        daemon.stop()
