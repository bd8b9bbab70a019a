"""Why runs failed, across many runs: native crashes, grouping, export."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap
from typing import Any

from conftest import Daemon, wait_for

SEGFAULT = textwrap.dedent("""
    import ctypes
    import runnerd_client as rd

    def deep_in_the_model():
        ctypes.string_at(0)

    with rd.run("native") as run:
        print(run.run_id, flush=True)
        deep_in_the_model()
""")


def test_segfault_is_signal_sigsegv_with_the_python_stack(daemon: Daemon) -> None:
    proc = daemon.python(SEGFAULT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -11
    run_id = out.strip()
    run = wait_for(lambda: (r := daemon.ctl_json("show", run_id))["state"] == "failed_crash"
                   and r, what="the crash to be recorded")
    failure = run["failure"]
    assert failure["failure_class"] == "Signal:SIGSEGV"
    assert failure["signal"] == "SIGSEGV"
    assert "Segmentation fault" in failure["message"]
    assert "deep_in_the_model" in failure["traceback"]
    assert "deep_in_the_model" in daemon.ctl("show", run_id).stdout


THREE_BUGS = textwrap.dedent("""
    import sys
    import runnerd_client as rd

    def load(path, n):
        raise FileNotFoundError(f"no such file: '/data/shard-{n}.bin'")

    def step(n):
        raise FloatingPointError(f"loss is nan at step {n * 1000 + 7}")

    def fetch(n):
        raise ConnectionError(f"connection to 10.0.0.{n}:8080 reset after {n}.5 s")

    client = rd.connect()
    for n in range(30):
        bug = (load, step, fetch)[n % 3]
        run = client.run("grouping", variation=f"cell-{n}").start()
        try:
            bug(n) if bug is not load else bug(f"/data/{n}", n)
        except Exception as exc:
            run.fail(exc=exc)
""")


def run_script(daemon: Daemon, code: str) -> None:
    proc = daemon.python(code)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_thirty_runs_three_bugs_make_three_signature_groups(daemon: Daemon) -> None:
    run_script(daemon, THREE_BUGS)
    groups = daemon.ctl_json("failures", "--group-by", "signature")
    assert sorted(g["count"] for g in groups) == [10, 10, 10]
    classes = {g["example"]["failure_class"] for g in groups}
    assert classes == {"FileNotFoundError", "FloatingPointError", "ConnectionError"}
    for group in groups:
        assert len(group["run_ids"]) == 5
        assert group["first_seen"] <= group["last_seen"]
    by_class = daemon.ctl_json("failures", "--group-by", "class")
    assert {g["key"]: g["count"] for g in by_class} == {
        "FileNotFoundError": 10, "FloatingPointError": 10, "ConnectionError": 10}
    text = daemon.ctl("failures", "--group-by", "signature").stdout
    assert text.splitlines()[0].split()[:2] == ["COUNT", "SIGNATURE"]
    assert len(daemon.ctl_json("failures")) == 30
    assert len(daemon.ctl_json("failures", "--experiment", "nothing")) == 0


def test_export_parses_line_by_line_and_round_trips_every_failure(daemon: Daemon) -> None:
    run_script(daemon, THREE_BUGS)
    lines = daemon.ctl("export", "--what", "failures").stdout.splitlines()
    exported = [json.loads(line) for line in lines]
    assert len(exported) == 30
    records = {f["run_id"]: f for f in daemon.ctl_json("failures")}
    for line in exported:
        assert line["timestamp"] == line["at"]
        assert line["details"]["task_id"] == line["run_id"]
        assert line["details"]["traceback"] == line["traceback"]
        original: dict[str, Any] = records[line["run_id"]]
        assert {k: line[k] for k in original} == original
    runs = [json.loads(line) for line in daemon.ctl("export").stdout.splitlines()]
    assert sorted(r["run_id"] for r in runs) == sorted(records)
    assert all(r["state"] == "failed_crash" for r in runs)


MIXED = textwrap.dedent("""
    import os, signal, sys
    import runnerd_client as rd

    errors = {
        "memory": MemoryError("cannot allocate 40 GiB"),
        "network": ConnectionError("connection reset by peer"),
        "import": ModuleNotFoundError("No module named 'torchvision'"),
        "value": ValueError("expected a positive learning rate, got -0.1"),
    }
    kind = sys.argv[1]
    with rd.run("mixed", variation=kind) as run:
        print(run.run_id, flush=True)
        if kind == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        raise errors[kind]
""")


def test_diagnose_names_category_retryability_and_a_suggestion(daemon: Daemon) -> None:
    run_ids = {}
    for kind in ("memory", "network", "import", "value", "killed"):
        proc = daemon.python(MIXED, kind)
        out, _ = proc.communicate(timeout=60)
        run_ids[kind] = out.strip()
    wait_for(lambda: daemon.ctl_json("show", run_ids["killed"])["state"] == "failed_crash",
             what="the killed run to be noticed")
    report = daemon.ctl_json("diagnose", "--experiment", "mixed")
    assert report["failures"] == 5
    by_run = {f["run_ids"][0]: f for f in report["findings"]}
    expected = {"memory": ("oom", False), "network": ("network", True),
                "import": ("dependency", False), "value": ("validation", False),
                "killed": ("signal", True)}
    for kind, (category, retryable) in expected.items():
        finding = by_run[run_ids[kind]]
        assert (finding["category"], finding["retryable"]) == (category, retryable), kind
        assert finding["suggestion"] and "\n" not in finding["suggestion"]
    stored = daemon.ctl_json("show", run_ids["network"])["failure"]
    assert (stored["category"], stored["retryable"]) == ("network", True)
    one = daemon.ctl_json("diagnose", run_ids["import"])
    assert [f["category"] for f in one["findings"]] == ["dependency"]
    latest = daemon.ctl_json("diagnose", "--latest")
    assert latest["failures"] == 1
    text = daemon.ctl("diagnose", "--experiment", "mixed").stdout
    assert "oom (not retryable)" in text and "suggestion:" in text
    groups = daemon.ctl_json("failures", "--group-by", "category")
    assert sorted(g["key"] for g in groups) == ["dependency", "network", "oom", "signal",
                                                 "validation"]


def test_progress_shows_on_a_terminal_only(daemon: Daemon) -> None:
    run_script(daemon, THREE_BUGS)
    piped = daemon.ctl("export")
    assert "exporting" not in piped.stderr
    master, slave = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "runnerd.cli", "export"], env=daemon.env,
                          stdout=subprocess.PIPE, stderr=slave, timeout=60)
    os.close(slave)
    shown = os.read(master, 65536).decode()
    os.close(master)
    assert proc.returncode == 0
    assert "exporting runs 30" in shown
