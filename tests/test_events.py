"""The live event stream: subscribe, resume with since, lagging, runnerctl follow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

from conftest import Daemon, RawClient, wait_for
from runnerd_client.connection import Connection
from runnerd_client.protocol import Subscribe

WORKER = textwrap.dedent("""
    import time
    import runnerd_client as rd
    with rd.run("stream", heartbeat_interval=0.2, heartbeat_timeout=1.0) as run:
        print(run.run_id, flush=True)
        while True:
            time.sleep(0.05)
""")


def collect(conn: Connection, until: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Events until `until(events)` is true."""
    events: list[dict[str, Any]] = []
    wait_for(lambda: (event := conn.next_event(timeout=0.1)) is not None and
             events.append(event) is None and until(events), timeout=timeout,
             interval=0, what="events")
    return events


def transitions(events: list[dict[str, Any]]) -> list[str]:
    return [e["to"] for e in events if e["event"] == "transition"]


def test_a_subscriber_sees_every_change_in_order_and_resumes_with_since(
        daemon: Daemon, procs: list[subprocess.Popen[str]]) -> None:
    watcher = Connection(daemon.socket)
    watcher.call(Subscribe(experiment="stream"))
    proc = daemon.python(WORKER)
    procs.append(proc)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    seen = collect(watcher, lambda ev: transitions(ev)[-1:] == ["running"])
    assert transitions(seen) == ["pending", "running"]
    os.kill(proc.pid, signal.SIGSTOP)
    seen += collect(watcher, lambda ev: transitions(ev)[-1:] == ["lost"])
    last_seen = seen[-1]["seq"]
    watcher.close()  # disconnect while things keep happening
    os.kill(proc.pid, signal.SIGCONT)
    wait_for(lambda: daemon.ctl_json("show", run_id)["state"] == "running", what="running")
    os.kill(proc.pid, signal.SIGKILL)
    wait_for(lambda: daemon.ctl_json("show", run_id)["state"] == "failed_crash", what="crash")
    again = Connection(daemon.socket)
    again.call(Subscribe(experiment="stream", since=last_seen))
    missed = collect(again, lambda ev: transitions(ev)[-1:] == ["failed_crash"])
    again.close()
    assert transitions(missed) == ["running", "failed_crash"]
    assert [e["event"] for e in missed][-2:] == ["failure", "transition"]
    full = Connection(daemon.socket)
    full.call(Subscribe(run=run_id, since=0))
    everything = collect(full, lambda ev: transitions(ev)[-1:] == ["failed_crash"])
    full.close()
    assert [e["seq"] for e in seen + missed] == [e["seq"] for e in everything]
    assert transitions(everything) == ["pending", "running", "lost", "running",
                                       "failed_crash"]
    assert all(e["run_id"] == run_id for e in everything)


CHATTY = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    client = rd.connect()
    for n in range(10):
        run = client.run("flood", variation=f"{sys.argv[1]}-{n}").start()
        for step in range(10):
            run.checkpoint({"step": step, "blob": "x" * 4000})
        run.succeed()
""")


def test_a_stalled_subscriber_is_told_it_lagged_and_slows_no_one(daemon: Daemon) -> None:
    stalled = RawClient(daemon.socket)  # a bare socket: nothing reads it meanwhile
    stalled.hello()
    assert stalled.call({"op": "subscribe", "id": 1})["ok"] is True
    writers = [daemon.python(CHATTY, str(n)) for n in range(16)]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert daemon.ctl_json("status")["counts"] == {"succeeded": 160}
    kinds = []
    stalled.sock.settimeout(2.0)
    try:
        while True:
            kinds.append(stalled.recv()["event"])
    except TimeoutError:
        pass
    stalled.close()
    assert "lagged" in kinds
    assert kinds.count("checkpoint") < 1600


def test_follow_prints_a_launched_run_and_exits_with_its_outcome(daemon: Daemon) -> None:
    result = subprocess.run([sys.executable, "-m", "runnerd.cli", "exec", "--experiment",
                             "followed", "--", "sh", "-c", "echo hi; exit 3"], env=daemon.env,
                            capture_output=True, timeout=60)
    assert result.returncode == 3
    run_id = daemon.ctl_json("list", "--experiment", "followed")[0]["run_id"]
    followed = daemon.ctl("follow", run_id, check=False)
    assert followed.returncode == 3
    lines = followed.stdout.splitlines()
    assert "-> pending" in lines[0] and "-> failed_crash" in lines[-1]
    assert any("artifact" in line and "stdout.log" in line for line in lines)
    assert any("failure ExitCode" in line for line in lines)
    as_json = daemon.ctl("follow", run_id, "--json", check=False)
    assert as_json.returncode == 3
    assert as_json.stdout.count("\n") == len(lines)


def test_follow_of_a_succeeded_run_exits_0(daemon: Daemon) -> None:
    subprocess.run([sys.executable, "-m", "runnerd.cli", "exec", "--experiment", "fine", "--",
                    "true"], env=daemon.env, check=True, capture_output=True, timeout=60)
    run_id = daemon.ctl_json("list", "--experiment", "fine")[0]["run_id"]
    assert daemon.ctl("follow", run_id).returncode == 0
