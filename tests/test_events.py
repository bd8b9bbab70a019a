"""The live event stream: subscribe, resume with since, lagging, runnerctl follow."""

from __future__ import annotations

import json
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
    wait_for(
        lambda: (
            (event := conn.next_event(timeout=0.1)) is not None
            and events.append(event) is None
            and until(events)
        ),
        timeout=timeout,
        interval=0,
        what="events",
    )
    return events


def transitions(events: list[dict[str, Any]]) -> list[str]:
    return [e["to"] for e in events if e["event"] == "transition"]


def test_a_subscriber_sees_every_change_in_order_and_resumes_with_since(
    daemon: Daemon, procs: list[subprocess.Popen[str]]
) -> None:
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
    assert transitions(everything) == ["pending", "running", "lost", "running", "failed_crash"]
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
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            "followed",
            "--",
            "sh",
            "-c",
            "echo hi; exit 3",
        ],
        env=daemon.env,
        capture_output=True,
        timeout=60,
    )
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
    subprocess.run(
        [sys.executable, "-m", "runnerd.cli", "exec", "--experiment", "fine", "--", "true"],
        env=daemon.env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    run_id = daemon.ctl_json("list", "--experiment", "fine")[0]["run_id"]
    assert daemon.ctl("follow", run_id).returncode == 0


TAGGED = textwrap.dedent("""
    import runnerd_client as rd
    with rd.run("tagged", variation="lr=0.1", tags={"team": "vision"}) as run:
        print(run.run_id, flush=True)
""")


def test_events_carry_the_runs_tags_experiment_and_variation(daemon: Daemon) -> None:
    live = Connection(daemon.socket)
    live.call(Subscribe())
    proc = daemon.python(TAGGED)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    run_id = out.strip()
    seen = collect(live, lambda ev: transitions(ev)[-1:] == ["succeeded"])
    live.close()
    replay = Connection(daemon.socket)
    replay.call(Subscribe(run=run_id, since=0))
    replayed = collect(replay, lambda ev: transitions(ev)[-1:] == ["succeeded"])
    replay.close()
    for events in (seen, replayed):
        assert transitions(events) == ["pending", "running", "succeeded"]
        for event in events:
            assert (event["run_id"], event["experiment"], event["variation"], event["tags"]) == (
                run_id,
                "tagged",
                "lr=0.1",
                {"team": "vision"},
            )


def test_the_end_of_a_sweep_is_an_event(daemon: Daemon) -> None:
    result = daemon.ctl(
        "sweep",
        "run",
        "--experiment",
        "swept",
        "--grid",
        "x=1,2",
        "--failure-policy",
        "continue_on_failure",
        "--",
        "sh",
        "-c",
        "exit $(( {x} - 1 ))",
        check=False,
    )
    assert result.returncode == 1, result.stderr
    sweep_id = daemon.ctl_json("sweep", "list")[0]["sweep_id"]
    conn = Connection(daemon.socket)
    conn.call(Subscribe(sweep=sweep_id, since=0))
    events = collect(conn, lambda ev: ev[-1]["event"] == "sweep_ended")
    conn.close()
    ended = events[-1]
    assert (ended["run_id"], ended["sweep_id"], ended["experiment"]) == (None, sweep_id, "swept")
    assert ended["status"] == "failed"
    assert (ended["cells"]["succeeded"], ended["cells"]["failed"]) == (1, 1)


def follow_lines(daemon: Daemon, *args: str, count: int) -> list[str]:
    """The first `count` lines `runnerctl follow ARGS` prints (it is stopped then)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runnerd.cli", "follow", *args],
        env=daemon.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        return [proc.stdout.readline() for _ in range(count)]
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_follow_since_replays_from_that_seq_then_streams_one_json_event_per_line(
    daemon: Daemon,
) -> None:
    for n in range(3):
        daemon.ctl("exec", "--experiment", "resumed", "--variation", f"v{n}", "--", "true")
    everything = [
        json.loads(line) for line in follow_lines(daemon, "--since", "0", "--json", count=6)
    ]
    assert [e["seq"] for e in everything] == sorted(e["seq"] for e in everything)
    middle = everything[3]["seq"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "follow",
            "--since",
            str(middle),
            "--experiment",
            "resumed",
            "--json",
        ],
        env=daemon.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        first = json.loads(proc.stdout.readline())
        assert first == everything[3]
        later = daemon.python(TAGGED)
        later.communicate(timeout=60)
        daemon.ctl("exec", "--experiment", "resumed", "--variation", "late", "--", "true")
        while (event := json.loads(proc.stdout.readline()))["variation"] != "late":
            assert event["experiment"] == "resumed" and event["seq"] > middle
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert event["tags"] == {} and event["event"] == "transition" and event["to"] == "pending"


def test_follow_since_refuses_a_negative_seq(daemon: Daemon) -> None:
    result = daemon.ctl("follow", "--since", "-1", check=False)
    assert result.returncode == 2 and "--since" in result.stderr
