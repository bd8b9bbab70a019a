"""Why runs failed, across many runs: native crashes, grouping, export."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap
from typing import Any

import pytest

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
    run = wait_for(
        lambda: (r := daemon.ctl_json("show", run_id))["state"] == "failed_crash" and r,
        what="the crash to be recorded",
    )
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
        "FileNotFoundError": 10,
        "FloatingPointError": 10,
        "ConnectionError": 10,
    }
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
    wait_for(
        lambda: daemon.ctl_json("show", run_ids["killed"])["state"] == "failed_crash",
        what="the killed run to be noticed",
    )
    report = daemon.ctl_json("diagnose", "--experiment", "mixed")
    assert report["failures"] == 5
    by_run = {f["run_ids"][0]: f for f in report["findings"]}
    expected = {
        "memory": ("oom", False),
        "network": ("network", True),
        "import": ("dependency", False),
        "value": ("validation", False),
        "killed": ("signal", True),
    }
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
    assert sorted(g["key"] for g in groups) == [
        "dependency",
        "network",
        "oom",
        "signal",
        "validation",
    ]


def test_progress_shows_on_a_terminal_only(daemon: Daemon) -> None:
    run_script(daemon, THREE_BUGS)
    piped = daemon.ctl("export")
    assert "exporting" not in piped.stderr
    master, slave = pty.openpty()
    proc = subprocess.run(
        [sys.executable, "-m", "runnerd.cli", "export"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=slave,
        timeout=60,
    )
    os.close(slave)
    shown = os.read(master, 65536).decode()
    os.close(master)
    assert proc.returncode == 0
    assert "exporting runs 30" in shown


# --- what runnerctl exec records of a command that raised (issue 19) ---------------------

FAKE_TORCH = {
    "torch/__init__.py": "",
    "torch/cuda/__init__.py": "class OutOfMemoryError(RuntimeError):\n    pass\n",
}
TRAIN = textwrap.dedent("""
    import json, sys
    import torch.cuda

    def forward(gib):
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {gib}.00 GiB. GPU 0 has a total capacity "
            "of 15.78 GiB of which 1.06 GiB is free.")

    def load_config():
        return json.loads("{'lr': 0.1}")

    def pick(shards, n):
        return shards[n]

    kind, n = sys.argv[1], int(sys.argv[2])
    print(f"step {n}: starting", file=sys.stderr)
    if kind == "oom":
        forward(n)
    elif kind == "config":
        load_config()
    else:
        pick([1, 2, 3], 10 + n)
""")


def exec_command(
    daemon: Daemon, experiment: str, *command: str, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runnerd.cli", "exec", "--experiment", experiment, "--", *command],
        env=daemon.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_files(root: Any, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cuda_oom_under_exec_reads_as_out_of_memory_not_exit_code(
    daemon: Daemon, short_tmp: Any
) -> None:
    write_files(short_tmp, {**FAKE_TORCH, "train.py": TRAIN})
    result = exec_command(daemon, "oom", sys.executable, "train.py", "oom", "2", cwd=str(short_tmp))
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith("1.06 GiB is free.")
    [failure] = daemon.ctl_json("failures", "--experiment", "oom")
    assert failure["failure_class"] == "torch.cuda.OutOfMemoryError"
    assert failure["message"].startswith("CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert (failure["category"], failure["retryable"]) == ("oom", False)
    assert failure["exit_code"] == 1
    assert "in forward" in failure["traceback"]
    table = daemon.ctl("failures", "--experiment", "oom").stdout.splitlines()
    assert table[0].split()[4:6] == ["CATEGORY", "RETRY"]
    row = table[1].split()
    assert row[row.index("crash") + 1 :][:2] == ["oom", "no"]
    assert "torch.cuda.OutOfMemoryError: CUDA out of memory" in table[1]
    assert "ExitCode" not in table[1]
    advice = daemon.ctl("diagnose", "--experiment", "oom").stdout
    assert "1 x oom (not retryable): out of memory (host or GPU)" in advice


def test_group_by_class_and_signature_give_one_group_per_bug(
    daemon: Daemon, short_tmp: Any
) -> None:
    write_files(short_tmp, {**FAKE_TORCH, "train.py": TRAIN})
    runs = [
        ("oom", 2),
        ("oom", 6),
        ("config", 1),
        ("config", 2),
        ("config", 3),
        ("index", 1),
        ("index", 2),
    ]
    for kind, n in runs:
        result = exec_command(
            daemon, "bugs", sys.executable, "train.py", kind, str(n), cwd=str(short_tmp)
        )
        assert result.returncode == 1, result.stderr
    by_class = daemon.ctl_json("failures", "--group-by", "class")
    assert {g["key"]: g["count"] for g in by_class} == {
        "json.decoder.JSONDecodeError": 3,
        "torch.cuda.OutOfMemoryError": 2,
        "IndexError": 2,
    }
    by_signature = daemon.ctl_json("failures", "--group-by", "signature")
    assert sorted(g["count"] for g in by_signature) == [2, 2, 3]
    found = daemon.ctl_json("diagnose", "--experiment", "bugs")["findings"]
    assert {(f["category"], f["count"]) for f in found} == {
        ("oom", 2),
        ("validation", 3),
        ("bug", 2),
    }
    report = daemon.ctl_json("report")
    assert sorted((g["failure_class"], g["count"]) for g in report["failure_groups"]) == [
        ("IndexError", 2),
        ("json.decoder.JSONDecodeError", 3),
        ("torch.cuda.OutOfMemoryError", 2),
    ]


POOL = textwrap.dedent("""
    import ctypes, os, signal, sys
    from concurrent.futures import ProcessPoolExecutor

    def work(how):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        ctypes.string_at(0)

    with ProcessPoolExecutor(1) as pool:
        pool.submit(work, sys.argv[1]).result()
""")


def test_a_pool_child_killed_is_told_from_one_that_segfaulted(
    daemon: Daemon, short_tmp: Any
) -> None:
    script = short_tmp / "pool.py"
    script.write_text(POOL)
    for how in ("kill", "segfault"):
        result = exec_command(daemon, f"pool-{how}", sys.executable, str(script), how)
        assert result.returncode == 1, result.stderr
        assert "BrokenProcessPool" in result.stderr
    [killed] = daemon.ctl_json("failures", "--experiment", "pool-kill")
    [crashed] = daemon.ctl_json("failures", "--experiment", "pool-segfault")
    assert (
        killed["failure_class"]
        == crashed["failure_class"]
        == "concurrent.futures.process.BrokenProcessPool"
    )
    assert (killed["category"], killed["retryable"]) == ("oom", False)
    assert (crashed["category"], crashed["retryable"]) == ("signal", False)


JOBLIB_AND_SKLEARN = textwrap.dedent("""
    import os, signal, sys

    def die(i):
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[1] == "joblib":
        from joblib import Parallel, delayed
        Parallel(n_jobs=2)(delayed(die)(i) for i in range(2))
    else:
        from sklearn.svm import SVC
        SVC(gamma=-1).fit([[0.0], [1.0]], [0, 1])
""")


def test_joblib_killed_workers_and_sklearn_parameters(daemon: Daemon, short_tmp: Any) -> None:
    pytest.importorskip("sklearn")  # with joblib; installed by the test extras (mlflow's)
    script = short_tmp / "libs.py"
    script.write_text(JOBLIB_AND_SKLEARN)
    for lib in ("joblib", "sklearn"):
        result = exec_command(daemon, lib, sys.executable, str(script), lib)
        assert result.returncode == 1, result.stderr
    [killed] = daemon.ctl_json("failures", "--experiment", "joblib")
    assert killed["failure_class"].endswith("TerminatedWorkerError")
    assert (killed["category"], killed["retryable"]) == ("oom", False)
    [invalid] = daemon.ctl_json("failures", "--experiment", "sklearn")
    assert invalid["failure_class"] == "sklearn.utils._param_validation.InvalidParameterError"
    assert "[0.0, inf)" in invalid["message"]
    assert (invalid["category"], invalid["retryable"]) == ("validation", False)
