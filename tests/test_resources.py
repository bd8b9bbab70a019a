"""Resources measured from outside, against real processes and real kernel limits."""

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
from runnerd.cli import parse_size
from runnerd.resources import Sampler


@pytest.fixture
def sampled(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon that samples every 0.2 s."""
    config = short_tmp / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("sample_interval = 0.2\n")
    daemon = Daemon(short_tmp).start()
    try:
        yield daemon
    finally:
        daemon.stop()


HUNGRY = textwrap.dedent("""
    import sys, time
    import runnerd_client as rd
    with rd.run("hungry") as run:
        data = b"x" * (300 << 20)  # allocated and touched
        busy = time.process_time() + 1.0
        while time.process_time() < busy:
            pass
        print(run.run_id, flush=True)
        sys.stdin.readline()
""")


def test_peak_memory_and_cpu_of_a_run(sampled: Daemon) -> None:
    proc = sampled.python(HUNGRY, stdin=subprocess.PIPE)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    run = wait_for(
        lambda: (
            (r := sampled.ctl_json("show", run_id))["resources"]
            and r["resources"]["peak_rss_bytes"] >= 300 << 20
            and r
        ),
        what="a sample",
    )
    use = run["resources"]
    assert 0.8 <= use["cpu_seconds"] <= 5.0
    assert use["limit_bytes"] > use["peak_rss_bytes"]
    assert use["history"] and use["history"][-1][2] >= 300 << 20
    listed = sampled.ctl("list").stdout
    assert "PEAK MEM" in listed and "M" in listed.splitlines()[1]
    proc.communicate("\n", timeout=60)


def exec_with_memory(
    daemon: Daemon, limit: str, megabytes: int, hold: float, experiment: str
) -> subprocess.CompletedProcess[bytes]:
    code = (
        "import time\nb = []\n"
        f"for _ in range({megabytes}):\n    b.append(b'x' * (1 << 20))\n"
        f"    time.sleep(0.01)\ntime.sleep({hold})"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            experiment,
            "--memory",
            limit,
            "--",
            sys.executable,
            "-c",
            code,
        ],
        env=daemon.env,
        capture_output=True,
        timeout=120,
    )
    if result.returncode == 126:
        pytest.skip(f"no writable memory cgroup here: {result.stderr.decode().strip()}")
    return result


def latest(daemon: Daemon, experiment: str) -> dict[str, Any]:
    run_id = daemon.ctl_json("list", "--experiment", experiment)[0]["run_id"]
    run: dict[str, Any] = daemon.ctl_json("show", run_id)
    return run


def test_exec_memory_limit_oom_kill_is_named(sampled: Daemon) -> None:
    result = exec_with_memory(sampled, "100M", 200, 0, "oom")
    assert result.returncode == 128 + signal.SIGKILL
    run = latest(sampled, "oom")
    failure = run["failure"]
    assert run["state"] == "failed_crash"
    assert failure["failure_class"] == "Signal:SIGKILL"
    assert failure["category"] == "oom" and failure["retryable"] is False
    assert "OOM killer" in failure["message"] and "of a 100 MiB limit" in failure["message"]
    assert "peak" in failure["message"]
    advice = sampled.ctl_json("diagnose", run["run_id"])["findings"][0]
    assert advice["category"] == "oom" and "memory" in advice["suggestion"]


def test_one_warning_per_crossing_of_the_threshold(sampled: Daemon) -> None:
    result = exec_with_memory(sampled, "160M", 110, 3.0, "near")
    assert result.returncode == 0, result.stderr
    run = latest(sampled, "near")
    assert run["state"] == "succeeded"
    events = [
        json.loads(line)
        for line in sampled.ctl("follow", run["run_id"], "--json").stdout.splitlines()
    ]
    warnings = [e for e in events if e["event"] == "memory_warning"]
    assert len(warnings) == 1
    assert len(run["resources"]["warnings"]) == 1
    assert "warning" in sampled.ctl("show", run["run_id"]).stdout


def test_a_sigkill_by_hand_far_below_the_limit_is_not_oom(sampled: Daemon) -> None:
    proc = sampled.python(
        textwrap.dedent("""
        import time
        import runnerd_client as rd
        with rd.run("killed") as run:
            print(run.run_id, flush=True)
            time.sleep(60)
    """)
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    wait_for(lambda: sampled.ctl_json("show", run_id)["resources"], what="a sample")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    run = wait_for(
        lambda: (r := sampled.ctl_json("show", run_id))["state"] == "failed_crash" and r,
        what="the crash",
    )
    assert run["failure"]["category"] != "oom"
    assert run["failure"]["failure_class"] == "ProcessExited"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100M", 100 << 20),
        ("2G", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("4096", 4096),
        ("64k", 65536),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_shared_process_is_sampled_once_and_unchanged_runs_cost_nothing() -> None:
    """1,000 runs attached to one sleeping process: one group; a second round finds nothing
    changed, so no run is updated and nothing would be written."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_for(
            lambda: Path(f"/proc/{sleeper.pid}/stat").read_text().split()[2] == "S",
            what="the sleeper to sleep",
        )
        runs = {f"run-{i}": {sleeper.pid} for i in range(1000)}
        sampler = Sampler(None, lambda: runs, 5.0, 0.9)  # type: ignore[arg-type]
        sampler.group_runs(0.0)
        assert len(sampler.groups) == 1
        first = sampler.measure(0.0)
        assert len(first.changed) == 1000
        assert {sampler.usage[r].rss_bytes for r in runs} == {
            next(iter(sampler.groups.values())).rss
        }
        assert sampler.measure(5.0).changed == []
        runs["late"] = {sleeper.pid}
        sampler.group_runs(10.0)
        assert sampler.measure(10.0).changed == ["late"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_that_ends_is_kept_a_while_then_forgotten() -> None:
    runs = {"a": {os.getpid()}, "b": {os.getpid()}}
    sampler = Sampler(None, lambda: runs, 5.0, 0.9)  # type: ignore[arg-type]
    sampler.group_runs(0.0)
    sampler.measure(0.0)
    del runs["a"]
    sampler.group_runs(1.0)
    assert sampler.usage["a"].group is None and sampler.usage["b"].group is not None
    assert sampler.explain_death("a") is None and sampler.peak_text("a")
