"""Hooks on run events: a real daemon running real hook commands (a Python script that
records what it was given), across restarts, failures, hangs and filters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from conftest import Daemon, wait_for
from runnerd.config import Config, ConfigError, Hook, load
from runnerd.hooks import cursor, runner
from runnerd.hooks.call import HookCall
from runnerd.hooks.runner import HookRunner, event_name, hook_event, wanted
from runnerd.registry import Registry
from runnerd_client.connection import Connection
from runnerd_client.protocol import Subscribe

RECORD = textwrap.dedent("""
    import json, os, subprocess, sys, time
    out, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    body = json.load(sys.stdin)
    event = body["event"]
    mark = f"{out}.{mode}-{event['seq']}"
    if mode == "fail-twice":
        tries = int(open(mark).read()) if os.path.exists(mark) else 0
        open(mark, "w").write(str(tries + 1))
        if tries < 2:
            print(f"not yet ({tries + 1})\\nsecond line \\x1b[31m", file=sys.stderr)
            sys.exit(3)
    if mode == "down" and os.path.exists(out + ".down"):
        print("the service is down", file=sys.stderr)
        sys.exit(1)
    if mode == "hang" and event["experiment"] == "hang" and not os.path.exists(mark):
        child = subprocess.Popen(["sleep", "3600"])
        open(mark, "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(3600)
    if mode == "slow":
        time.sleep(0.02)
    line = {"hook": body["hook"], "seq": event["seq"], "name": event["name"],
            "kind": event["kind"], "run_id": event["run_id"], "sweep_id": event["sweep_id"],
            "experiment": event["experiment"], "variation": event["variation"],
            "tags": event["tags"], "at": event["at"], "data": event["data"],
            "run": body["run"], "sweep": body.get("sweep"),
            "env": {k: v for k, v in os.environ.items() if k.startswith("RUNNERD_")
                    and k not in ("RUNNERD_DB",)}}
    with open(out, "a") as fh:
        fh.write(json.dumps(line) + "\\n")
""")


STREAM = textwrap.dedent("""
    import json, os, subprocess, sys, time
    out, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""

    def answer(doc):
        print(json.dumps(doc), flush=True)

    for line in sys.stdin:
        body = json.loads(line)
        event = body["event"]
        mark = f"{out}.{mode}-{event['seq']}"
        first = not os.path.exists(mark)
        if mode == "fail-twice":
            tries = 0 if first else int(open(mark).read())
            open(mark, "w").write(str(tries + 1))
            if tries < 2:
                print(f"stderr of try {tries + 1}", file=sys.stderr, flush=True)
                answer({"ok": False, "error": f"not yet ({tries + 1})"})
                continue
        if mode == "down" and os.path.exists(out + ".down"):
            answer({"ok": False, "seq": event["seq"], "error": "the service is down"})
            continue
        if mode in ("die", "garble", "hang") and event["name"] == "running" and first:
            child = subprocess.Popen(["sleep", "3600"])
            open(mark, "w").write(f"{os.getpid()} {child.pid}")
            print(f"{mode} on event {event['seq']}", file=sys.stderr, flush=True)
            if mode == "die":
                os._exit(5)
            if mode == "garble":
                print("hello", flush=True)
                continue
            time.sleep(3600)
        with open(out, "a") as fh:
            fh.write(json.dumps({"seq": event["seq"], "name": event["name"],
                                 "run_id": event["run_id"], "sweep_id": event["sweep_id"],
                                 "experiment": event["experiment"], "pid": os.getpid(),
                                 "mode": os.environ["RUNNERD_HOOK_MODE"]}) + "\\n")
        answer({"ok": True, "seq": event["seq"]})
    with open(out + ".closed", "a") as fh:
        fh.write(f"{os.getpid()}\\n")  # the daemon closed the stream: a clean end
""")


def hook_table(name: str, out: Path, mode: str = "", events: str = '["*"]', extra: str = "") -> str:
    argv = [sys.executable, str(out.parent / "record.py"), str(out), *([mode] if mode else [])]
    return (
        f"[[hooks]]\nname = {json.dumps(name)}\nevents = {events}\n"
        f"command = {json.dumps(argv)}\n{extra}\n"
    )


@pytest.fixture
def hooked(short_tmp: Path) -> Iterator[Daemon]:
    """A daemon, not started: the test writes its config first (`configure`)."""
    (short_tmp / "record.py").write_text(RECORD)
    (short_tmp / "stream.py").write_text(STREAM)
    daemon = Daemon(short_tmp)
    try:
        yield daemon
    finally:
        daemon.stop()


def configure(daemon: Daemon, *tables: str, concurrency: int = 4) -> None:
    daemon.config.parent.mkdir(parents=True, exist_ok=True)
    daemon.config.write_text(f"hook_concurrency = {concurrency}\n" + "".join(tables))


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def hooks_status(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {hook["name"]: hook for hook in daemon.ctl_json("hooks")["hooks"]}


def settled(daemon: Daemon, *names: str) -> bool:
    """Every named hook has delivered all it wants of the log."""
    status = hooks_status(daemon)
    return all(status[name]["backlog"] == 0 for name in names)


def logged(daemon: Daemon) -> list[dict[str, Any]]:
    """The whole event log, as `subscribe` replays it."""
    last = daemon.ctl_json("hooks")["last_seq"]
    conn = Connection(daemon.socket)
    conn.call(Subscribe(since=0))
    events: list[dict[str, Any]] = []
    while not events or events[-1]["seq"] < last:
        event = conn.next_event(timeout=10)
        assert event is not None, "the log replay stopped short"
        events.append(event)
    conn.close()
    return events


def run_exec(daemon: Daemon, experiment: str, command: str = "true", *args: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "runnerd.cli",
            "exec",
            "--experiment",
            experiment,
            *args,
            "--",
            "sh",
            "-c",
            command,
        ],
        env=daemon.env,
        capture_output=True,
        timeout=60,
        check=False,
    )


def in_order_per_run(got: list[dict[str, Any]]) -> bool:
    by_run: dict[str, list[int]] = {}
    for record in got:
        by_run.setdefault(record["run_id"] or record["sweep_id"], []).append(record["seq"])
    return all(seqs == sorted(seqs) for seqs in by_run.values())


def test_each_event_is_delivered_once_across_a_daemon_restart(hooked: Daemon) -> None:
    out = hooked.root / "all.jsonl"
    configure(hooked, hook_table("all", out))
    hooked.start()
    run_exec(hooked, "before", "exit 0")
    run_exec(hooked, "before", "exit 2")
    wait_for(lambda: settled(hooked, "all"), what="the hook to deliver everything")
    assert hooked.stop() == 0
    hooked.start()
    run_exec(hooked, "after", "echo out")
    wait_for(lambda: settled(hooked, "all"), what="the hook to deliver after the restart")
    got = records(out)
    assert [r["seq"] for r in got] == [e["seq"] for e in logged(hooked)]
    assert {r["experiment"] for r in got} == {"before", "after"}
    assert [r["name"] for r in got if r["experiment"] == "before"] == [
        "pending",
        "running",
        "succeeded",
        "pending",
        "running",
        "failure",
        "failed_crash",
    ]


def test_a_hook_that_was_down_catches_up_after_a_restart_in_order(hooked: Daemon) -> None:
    out = hooked.root / "down.jsonl"
    Path(f"{out}.down").touch()
    configure(hooked, hook_table("down", out, "down"))
    hooked.start()
    for n in range(3):
        run_exec(hooked, "missed", f"exit {n}")
    wait_for(lambda: hooks_status(hooked)["down"]["failed"] >= 2, what="failed calls")
    assert records(out) == []
    assert hooks_status(hooked)["down"]["last"]["error"] == "the service is down"
    hooked.stop()
    os.unlink(f"{out}.down")
    hooked.start()
    wait_for(lambda: settled(hooked, "down"), timeout=30, what="the hook to catch up")
    got = records(out)
    assert sorted(r["seq"] for r in got) == [e["seq"] for e in logged(hooked)]
    assert in_order_per_run(got)
    assert len({r["run_id"] for r in got}) == 3


def test_a_hook_that_fails_twice_gets_the_event_then_the_next_in_order(hooked: Daemon) -> None:
    out = hooked.root / "flaky.jsonl"
    configure(hooked, hook_table("flaky", out, "fail-twice", '["running", "succeeded"]'))
    hooked.start()
    run_exec(hooked, "flaky")
    failing = wait_for(
        lambda: (
            (hook := hooks_status(hooked)["flaky"])["last"] and hook["last"]["exit"] == 3 and hook
        ),
        what="a failed call",
    )
    # the failing event holds back the run's next one
    assert failing["backlog"] == {"running": 2, "succeeded": 1}[failing["last"]["event"]]
    assert failing["retrying"] == 1
    assert failing["last"]["error"].endswith(")\nsecond line \x1b[31m")  # exact in JSON

    def listed_failing() -> str:
        text = hooked.ctl("hooks").stdout
        return text if "exit 3: not yet (" in text else ""

    listed = wait_for(listed_failing, what="runnerctl hooks to show the failure")
    assert "second line \\x1b[31m" in listed  # escaped for the terminal
    wait_for(lambda: settled(hooked, "flaky"), timeout=30, what="the retries to succeed")
    got = records(out)
    assert [r["name"] for r in got] == ["running", "succeeded"]
    assert hooks_status(hooked)["flaky"]["failed"] == 4  # two per event
    warnings = [line for line in hooked.log.read_text().splitlines() if "hook flaky: event" in line]
    assert len(warnings) == 4
    assert "not yet (1)\\nsecond line \\x1b[31m" in warnings[0]


def test_a_hanging_hook_is_killed_at_its_timeout_and_the_rest_go_on(hooked: Daemon) -> None:
    out = hooked.root / "hang.jsonl"
    configure(hooked, hook_table("hang", out, "hang", '["pending"]', "timeout = 5"))
    hooked.start()
    run_exec(hooked, "hang")
    mark = wait_for(
        lambda: (
            next(hooked.root.glob("hang.jsonl.hang-*"), None)
            and next(hooked.root.glob("hang.jsonl.hang-*")).read_text()
        ),
        what="the hook to hang",
    )
    others = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runnerd.cli",
                "exec",
                "--experiment",
                "fine",
                "--variation",
                f"v{n}",
                "--",
                "true",
            ],
            env=hooked.env,
        )
        for n in range(3)
    ]
    for proc in others:
        proc.wait(timeout=60)
    wait_for(lambda: len(records(out)) == 3, what="the other runs' events")
    assert [r["experiment"] for r in records(out)] == ["fine"] * 3
    wait_for(lambda: settled(hooked, "hang"), timeout=30, what="the retry after the timeout")
    assert records(out)[-1]["experiment"] == "hang"
    for pid in map(int, mark.split()):  # the hook and what it started, killed together
        wait_for(lambda pid=pid: gone(pid), what=f"pid {pid} to be killed")
    assert any(
        "timed out after 5 s; killed" in line for line in hooked.log.read_text().splitlines()
    )


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it was killed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


ORDERED = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    client = rd.connect()
    for n in range(4):
        run = client.run("ordered", variation=f"{sys.argv[1]}-{n}").start()
        for step in range(5):
            run.checkpoint({"step": step})
        run.succeed()
""")


def test_events_reach_the_hook_in_order_per_run_with_runs_side_by_side(hooked: Daemon) -> None:
    out = hooked.root / "ordered.jsonl"
    configure(hooked, hook_table("ordered", out, "slow"), concurrency=4)
    hooked.start()
    writers = [hooked.python(ORDERED, str(n)) for n in range(3)]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    wait_for(lambda: settled(hooked, "ordered"), timeout=60, what="every delivery")
    got = records(out)
    assert sorted(r["seq"] for r in got) == [e["seq"] for e in logged(hooked)]
    assert len({r["run_id"] for r in got}) == 12
    assert in_order_per_run(got)
    assert [r["name"] for r in got if r["run_id"] == got[0]["run_id"]] == [
        "pending",
        "running",
        *["checkpoint"] * 5,
        "succeeded",
    ]


TAGGED = textwrap.dedent("""
    import sys
    import runnerd_client as rd
    team, fail = sys.argv[1], sys.argv[2] == "fail"
    with rd.run(sys.argv[3], tags={"team": team}) as run:
        if fail:
            raise ValueError("boom")
""")


def test_hooks_get_only_the_events_their_patterns_experiment_and_tags_match(hooked: Daemon) -> None:
    configure(
        hooked,
        hook_table("failed", hooked.root / "failed.jsonl", events='["failed_*", "lost"]'),
        hook_table(
            "lr", hooked.root / "lr.jsonl", events='["succeeded"]', extra='experiment = "lr-*"'
        ),
        hook_table(
            "vision",
            hooked.root / "vision.jsonl",
            events='["*ed*"]',
            extra='tags = { team = "vision" }',
        ),
        hook_table("sweeps", hooked.root / "sweeps.jsonl", events='["sweep_ended"]'),
    )
    hooked.start()
    for team, outcome, experiment in (
        ("vision", "fail", "lr-1"),
        ("audio", "ok", "lr-2"),
        ("vision", "ok", "other"),
        ("audio", "fail", "other"),
    ):
        proc = hooked.python(TAGGED, team, outcome, experiment)
        proc.communicate(timeout=60)
    hooked.ctl("sweep", "run", "--experiment", "lr-sweep", "--grid", "x=1", "--", "true")
    wait_for(
        lambda: settled(hooked, "failed", "lr", "vision", "sweeps"), what="every hook to deliver"
    )

    def seen(name: str) -> list[tuple[str, str]]:
        return [(r["experiment"], r["name"]) for r in records(hooked.root / f"{name}.jsonl")]

    assert sorted(seen("failed")) == [("lr-1", "failed_crash"), ("other", "failed_crash")]
    assert sorted(seen("lr")) == [("lr-2", "succeeded"), ("lr-sweep", "succeeded")]
    assert sorted(seen("vision")) == [("lr-1", "failed_crash"), ("other", "succeeded")]
    assert seen("sweeps") == [("lr-sweep", "sweep_ended")]
    ended = records(hooked.root / "sweeps.jsonl")[0]
    assert ended["run"] is None and ended["sweep"]["status"] == "succeeded"
    assert ended["data"]["status"] == "succeeded" and ended["env"]["RUNNERD_RUN_ID"] == ""


def test_the_command_gets_the_event_the_run_and_the_environment(hooked: Daemon) -> None:
    out = hooked.root / "payload.jsonl"
    configure(hooked, hook_table("payload", out, events='["failed_crash"]'))
    hooked.start()
    proc = hooked.python(TAGGED, "vision", "fail", "payload")
    proc.communicate(timeout=60)
    wait_for(lambda: records(out), what="the delivery")
    (got,) = records(out)
    run = hooked.ctl_json("show", got["run_id"])
    changing = ("pids", "resources")  # its process, gone since, is detached; samples
    assert {k: v for k, v in got["run"].items() if k not in changing} == {
        k: v for k, v in run.items() if k not in changing
    }
    assert got["run"].keys() == run.keys()
    assert (
        got["hook"],
        got["kind"],
        got["name"],
        got["experiment"],
        got["variation"],
        got["tags"],
    ) == ("payload", "transition", "failed_crash", "payload", "default", {"team": "vision"})
    assert got["data"]["from"] == "running" and got["data"]["to"] == "failed_crash"
    assert abs(got["at"] - _unix(run["ended_at"])) < 0.01
    assert got["env"] == {
        "RUNNERD_HOOK": "payload",
        "RUNNERD_EVENT": "failed_crash",
        "RUNNERD_RUN_ID": got["run_id"],
        "RUNNERD_STATE": "failed_crash",
        "RUNNERD_EXPERIMENT": "payload",
        "RUNNERD_SOCKET": str(hooked.socket),
    }


def _unix(iso_time: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso_time).timestamp()


def test_runnerctl_hooks_lists_each_hook_with_its_last_result(hooked: Daemon) -> None:
    out = hooked.root / "listed.jsonl"
    configure(
        hooked,
        hook_table("listed", out, events='["succeeded"]'),
        '[[hooks]]\nname = "broken"\nevents = ["failed_*"]\n'
        'command = "echo no such service >&2; exit 7"\n',
    )
    hooked.start()
    assert [line.split()[:6] for line in hooked.ctl("hooks").stdout.splitlines()[1:]] == [
        ["listed", "succeeded", "0", "0", "0", "-"],
        ["broken", "failed_*", "0", "0", "0", "-"],
    ]
    run_exec(hooked, "listed", "exit 0")
    run_exec(hooked, "listed", "exit 1")
    wait_for(
        lambda: (
            hooks_status(hooked)["broken"]["failed"] and hooks_status(hooked)["listed"]["delivered"]
        ),
        what="both hooks to be called",
    )
    doc = hooked.ctl_json("hooks")
    listed, broken = doc["hooks"]
    assert (listed["name"], listed["events"], listed["backlog"], listed["delivered"]) == (
        "listed",
        ["succeeded"],
        0,
        1,
    )
    assert listed["last"]["ok"] is True and listed["last"]["exit"] == 0
    assert listed["command"][-1] == str(out) and listed["timeout"] == 30
    assert broken["command"] == "echo no such service >&2; exit 7"
    assert (broken["last"]["exit"], broken["last"]["error"]) == (7, "no such service")
    assert broken["backlog"] == 1 and broken["retrying"] == 1
    assert doc["last_seq"] == logged(hooked)[-1]["seq"]
    lines = hooked.ctl("hooks").stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "EVENTS",
        "BACKLOG",
        "RETRYING",
        "DELIVERED",
        "LAST",
        "RESULT",
    ]
    assert lines[1].split()[:5] == ["listed", "succeeded", "0", "0", "1"]
    assert "ok in" in lines[1]
    assert lines[2].split()[:5] == ["broken", "failed_*", "1", "1", "0"]
    assert lines[2].endswith("exit 7: no such service")


def test_runnerctl_hooks_without_hooks_says_so(daemon: Daemon) -> None:
    assert "no hooks configured" in daemon.ctl("hooks").stdout
    assert daemon.ctl_json("hooks")["hooks"] == []


# --- stream hooks: one process, an event per line, an acknowledgement per line ----------


def stream_table(
    name: str, out: Path, mode: str = "", events: str = '["*"]', extra: str = ""
) -> str:
    argv = [sys.executable, str(out.parent / "stream.py"), str(out), *([mode] if mode else [])]
    return (
        f'[[hooks]]\nname = {json.dumps(name)}\nevents = {events}\nmode = "stream"\n'
        f"command = {json.dumps(argv)}\n{extra}\n"
    )


def closed(out: Path) -> list[int]:
    """The pids of the stream processes that saw their stdin closed and exited by themselves."""
    path = Path(f"{out}.closed")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def test_a_stream_hook_gets_every_event_once_in_order_per_run_from_one_process(
    hooked: Daemon,
) -> None:
    out = hooked.root / "stream.jsonl"
    configure(hooked, stream_table("stream", out), concurrency=4)
    hooked.start()
    writers = [hooked.python(ORDERED, str(n)) for n in range(2)]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    wait_for(lambda: settled(hooked, "stream"), timeout=60, what="every delivery")
    got = records(out)
    assert sorted(r["seq"] for r in got) == [e["seq"] for e in logged(hooked)]
    assert in_order_per_run(got) and len({r["run_id"] for r in got}) == 8
    assert {(r["pid"], r["mode"]) for r in got} == {(got[0]["pid"], "stream")}
    status = hooks_status(hooked)["stream"]
    assert (status["mode"], status["delivered"], status["failed"]) == ("stream", len(got), 0)
    assert hooked.stop() == 0
    assert closed(out) == [got[0]["pid"]]  # its stdin closed, it ended by itself


def test_a_stream_hook_catches_up_from_its_cursor_after_a_daemon_restart(hooked: Daemon) -> None:
    out = hooked.root / "down.jsonl"
    Path(f"{out}.down").touch()
    configure(hooked, stream_table("down", out, "down"))
    hooked.start()
    for n in range(3):
        run_exec(hooked, "missed", f"exit {n}")
    wait_for(lambda: hooks_status(hooked)["down"]["failed"] >= 2, what="refused events")
    status = hooks_status(hooked)["down"]
    assert (status["last"]["ok"], status["last"]["error"]) == (False, "the service is down")
    assert records(out) == []
    hooked.stop()
    os.unlink(f"{out}.down")
    hooked.start()
    wait_for(lambda: settled(hooked, "down"), timeout=30, what="the hook to catch up")
    run_exec(hooked, "after")
    wait_for(lambda: settled(hooked, "down"), timeout=30, what="the new run's events")
    got = records(out)
    assert sorted(r["seq"] for r in got) == [e["seq"] for e in logged(hooked)]
    assert in_order_per_run(got) and len({r["run_id"] for r in got}) == 4
    assert len(closed(out)) == 1  # the first daemon's process, closed at its stop


def test_a_stream_hook_that_fails_twice_gets_the_event_once_from_the_same_process(
    hooked: Daemon,
) -> None:
    out = hooked.root / "flaky.jsonl"
    configure(hooked, stream_table("flaky", out, "fail-twice", '["running", "succeeded"]'))
    hooked.start()
    run_exec(hooked, "flaky")
    failing = wait_for(
        lambda: (hook := hooks_status(hooked)["flaky"])["failed"] and hook,
        what="a refused event",
    )
    assert failing["last"]["error"] in ("not yet (1)", "not yet (2)")  # the answer's error
    assert failing["last"]["exit"] is None
    assert failing["retrying"] == 1
    wait_for(lambda: settled(hooked, "flaky"), timeout=30, what="the retries to succeed")
    got = records(out)
    assert [r["name"] for r in got] == ["running", "succeeded"]
    assert got[0]["pid"] == got[1]["pid"]  # an error answered is no reason to restart it
    assert hooks_status(hooked)["flaky"]["failed"] == 4
    warnings = [line for line in hooked.log.read_text().splitlines() if "hook flaky: event" in line]
    assert len(warnings) == 4 and "not yet (2)" in warnings[1]


@pytest.mark.parametrize(
    ("mode", "timeout", "error"),
    [
        ("die", 30, "exited 5 before acknowledging: die on event"),
        ("garble", 30, "answered 'hello', not an acknowledgement of event"),
        ("hang", 5, "timed out after 5 s; killed"),
    ],
)
def test_a_stream_process_that_dies_answers_wrongly_or_hangs_is_replaced(
    hooked: Daemon, mode: str, timeout: int, error: str
) -> None:
    out = hooked.root / f"{mode}.jsonl"
    configure(hooked, stream_table(mode, out, mode, extra=f"timeout = {timeout}"))
    hooked.start()
    run_exec(hooked, mode)
    wait_for(lambda: settled(hooked, mode), timeout=60, what="the redelivery to succeed")
    got = records(out)
    assert [r["seq"] for r in got] == [e["seq"] for e in logged(hooked)]
    assert [r["name"] for r in got] == ["pending", "running", "succeeded"]
    assert got[0]["pid"] != got[1]["pid"] == got[2]["pid"]  # a new process from `running` on
    mark = next(hooked.root.glob(f"{mode}.jsonl.{mode}-*")).read_text()
    for pid in map(int, mark.split()):  # the process and what it started, killed together
        wait_for(lambda pid=pid: gone(pid), what=f"pid {pid} to be gone")
    status = hooks_status(hooked)[mode]
    assert (status["failed"], status["delivered"]) == (1, 3)
    warnings = [
        line for line in hooked.log.read_text().splitlines() if f"hook {mode}: event" in line
    ]
    assert len(warnings) == 1 and error in warnings[0], warnings


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('events = ["failed_*"]\ncommand = ["true"]', "name is required"),
        ('name = "a/b"\nevents = ["*"]\ncommand = ["true"]', "name is required"),
        (
            'name = "x"\nevents = ["faild_*"]\ncommand = ["true"]',
            "events pattern 'faild_*' matches no event",
        ),
        ('name = "x"\nevents = []\ncommand = ["true"]', "events must be a list of patterns"),
        ('name = "x"\nevents = ["*"]\ncommand = []', "command must be a list"),
        (
            'name = "x"\nevents = ["*"]\ncommand = ["true"]\ntimeout = 0',
            "timeout must be a positive number",
        ),
        (
            'name = "x"\nevents = ["*"]\ncommand = ["true"]\ntags = { a = [1] }',
            "tags must be a table of values",
        ),
        ('name = "x"\nevents = ["*"]\ncommand = ["true"]\nretries = 3', "unknown key 'retries'"),
        (
            'name = "x"\nevents = ["*"]\ncommand = ["true"]\nmode = "daemon"',
            'mode must be "call" (a process per event) or "stream"',
        ),
    ],
)
def test_a_bad_hooks_table_is_refused_by_name(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[[hooks]]\n{table}\n")
    with pytest.raises(ConfigError, match="hooks\\[0\\]") as caught:
        load(path)
    assert message in str(caught.value)
    refused = subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and message in refused.stderr


def test_every_event_the_daemon_logs_can_be_hooked(tmp_path: Path) -> None:
    """A hook may ask for each kind the registry logs (stalled included), by name."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[[hooks]]\nname = "x"\nevents = ["stalled", "memory_warning", "lost"]\n'
        'command = ["true"]\n'
    )
    assert load(path).hooks[0].events == ("stalled", "memory_warning", "lost")


def test_two_hooks_with_one_name_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[hooks]]\nname = "x"\nevents = ["*"]\ncommand = ["true"]\n' * 2)
    with pytest.raises(ConfigError, match="two hooks are named 'x'"):
        load(path)


# --- pure logic and single calls ---------------------------------------------------


def _wire(kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "event": kind,
        "seq": 7,
        "run_id": "R1",
        "experiment": "lr-1",
        "variation": "v",
        "tags": {"team": "vision", "seed": 1},
        "sweep_id": None,
        "at": "2026-01-02T03:04:05.678Z",
        **fields,
    }


def test_an_event_is_named_by_its_new_state_or_its_kind() -> None:
    assert event_name(_wire("transition", to="failed_lost")) == "failed_lost"
    assert event_name(_wire("sweep_ended", status="failed")) == "sweep_ended"
    assert event_name(_wire("artifact", path="x")) == "artifact"


def test_filters_need_every_part_to_match() -> None:
    failed = _wire("transition", to="failed_crash")
    hook = Hook(
        name="h",
        events=("failed_*", "lost"),
        command=("true",),
        experiment="lr-*",
        tags={"team": "vision"},
    )
    assert wanted(hook, failed)
    assert not wanted(hook, _wire("transition", to="succeeded"))
    assert not wanted(hook, {**failed, "experiment": "other"})
    assert not wanted(hook, {**failed, "tags": {"team": "audio"}})
    assert not wanted(hook, {**failed, "tags": {}})
    assert not wanted(
        Hook(name="h", events=("*",), command="true", tags={"seed": "1"}), failed
    )  # 1 is not "1"


def test_the_hook_event_keeps_the_kinds_fields_under_data() -> None:
    event = hook_event(_wire("checkpoint", data={"step": 3}, path="ckpt"))
    assert event == {
        "seq": 7,
        "kind": "checkpoint",
        "name": "checkpoint",
        "run_id": "R1",
        "experiment": "lr-1",
        "variation": "v",
        "tags": {"team": "vision", "seed": 1},
        "sweep_id": None,
        "at": 1767323045.678,
        "data": {"data": {"step": 3}, "path": "ckpt"},
    }


def test_a_call_that_cannot_start_or_writes_a_lot_says_why(tmp_path: Path) -> None:
    missing = HookCall((str(tmp_path / "missing"),), {}, {}, 5).run()
    assert not missing.ok and missing.exit is None and "cannot start" in (missing.error or "")
    chatty = HookCall(
        "head -c 3000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo last >&2; exit 4", {}, {}, 10
    ).run()
    assert (chatty.ok, chatty.exit) == (False, 4)
    assert chatty.error is not None and chatty.error.endswith("x\nlast")
    assert len(chatty.error) <= 600
    unread = HookCall(("true",), "x" * (4 << 20), {}, 5).run()
    assert unread.ok  # a payload larger than a pipe, never read: no deadlock
    killed = HookCall("kill -TERM $$", None, {}, 5).run()
    assert (killed.exit, killed.error) == (-signal.SIGTERM, "killed by SIGTERM")


def test_a_cursor_is_never_read_or_written_through_a_symlink(tmp_path: Path) -> None:
    folder = tmp_path / "hooks"
    folder.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"seq": 99, "delivered": []}')
    (folder / "h.json").symlink_to(elsewhere)
    assert cursor.load(folder, "h") is None
    cursor.save(folder, "h", cursor.Cursor(5, {7, 9}))
    assert elsewhere.read_text() == '{"seq": 99, "delivered": []}'
    assert not (folder / "h.json").is_symlink()
    saved = cursor.load(folder, "h")
    assert saved is not None and (saved.seq, saved.delivered) == (5, {7, 9})
    (folder / "h.json").write_text("not json")
    assert cursor.load(folder, "h") is None


async def test_a_full_window_stops_reading_the_log_until_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, on a real registry: with room for 4 waiting events and pages of 3, a
    hook that catches up on 30 logged events while 30 more are committed delivers each
    once, in order per run."""
    monkeypatch.setattr(runner, "WINDOW", 4)
    monkeypatch.setattr(runner, "PAGE", 3)
    out = tmp_path / "delivered.jsonl"
    registry = Registry(tmp_path / "state" / "registry.sqlite3")
    await registry.open()
    hook = Hook(name="w", events=("*",), command=("sh", "-c", f'printf "%s\\n" "$(cat)" >> {out}'))
    cfg = Config(
        db=registry.path, socket=tmp_path / "runnerd.sock", hooks=(hook,), hook_concurrency=2
    )
    folder = registry.path.parent / "hooks"
    folder.mkdir(mode=0o700)
    cursor.save(folder, "w", cursor.Cursor(0))  # it has everything logged below to catch up

    async def log(numbers: range) -> None:
        for n in numbers:
            await registry.submit(
                lambda store, n=n: store.events.log(
                    f"run{n % 3}", "checkpoint", time.time(), {"data": n, "path": None}
                )
            )

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(registry.run_writer)
        await log(range(30))
        hooks = HookRunner(cfg, registry)
        registry.subscribers.append(hooks.on_commit)
        tasks.start_soon(hooks.run)
        await log(range(30, 60))
        with anyio.fail_after(60):  # delivered, and the cursor saved past the last one
            while len(records(out)) < 60 or getattr(cursor.load(folder, "w"), "seq", 0) < 60:
                await anyio.sleep(0.01)
        tasks.cancel_scope.cancel()
    await registry.close_db()
    got = [
        (body["event"]["run_id"], body["event"]["seq"], body["event"]["data"]["data"])
        for body in records(out)
    ]
    assert sorted(seq for _, seq, _ in got) == list(range(1, 61))
    for run_id in ("run0", "run1", "run2"):
        numbers = [n for run, _, n in got if run == run_id]
        assert numbers == sorted(numbers) and len(numbers) == 20
    saved = cursor.load(folder, "w")
    assert saved is not None and saved.seq == 60
