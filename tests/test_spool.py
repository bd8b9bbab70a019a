"""A client never loses an event: the daemon down, killed, restarted, or never started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from conftest import Daemon, wait_for
from runnerd_client.protocol import Heartbeat, Succeed, frame, request_map
from runnerd_client.spool import parse

FULL_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import runnerd_client as rd

    with rd.run("offline", variation=sys.argv[1], params={"x": 1},
                heartbeat_interval=3600) as run:
        print(run.run_id, flush=True)
        for _ in range(5):
            run.heartbeat()
        out = Path(run.run_dir) / "out.txt"
        out.write_text("done")
        run.artifact(out)
        run.checkpoint({"step": 5})
        if sys.argv[1] == "wait":
            print("waiting", flush=True)
            sys.stdin.readline()
        for _ in range(5):
            run.heartbeat()
    print("spooling" if rd.connect().spooling else "live", flush=True)
""")


def assert_whole_history(daemon: Daemon, run_id: str, pid: int) -> dict[str, Any]:
    run: dict[str, Any] = daemon.ctl_json("show", run_id)
    assert run["state"] == "succeeded"
    assert [t["to"] for t in run["transitions"]] == ["pending", "running", "succeeded"]
    assert {t["source"] for t in run["transitions"]} == {f"client:{pid}"}
    assert run["heartbeats"] == 10
    assert [a["path"].rsplit("/", 1)[-1] for a in run["artifacts"]] == ["out.txt"]
    assert [c["data"] for c in run["checkpoints"]] == [{"step": 5}]
    assert run["attempt"] == 1
    return run


def test_history_made_without_a_daemon_appears_once_when_it_starts(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    proc = daemon.python(FULL_RUN, "ok")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    run_id, mode = out.split()
    assert mode == "spooling"
    assert err.count("not reachable") == 1
    assert list((short_tmp / "state" / "spool").glob("*.spool"))
    daemon.start()
    try:
        run = assert_whole_history(daemon, run_id, proc.pid)
        assert run["created_at"] <= run["started_at"] <= run["ended_at"]
        assert not list((short_tmp / "state" / "spool").glob("*.spool"))
        daemon.stop()
        daemon.start()  # a second start replays nothing twice
        assert_whole_history(daemon, run_id, proc.pid)
    finally:
        daemon.stop()


def test_client_started_before_the_daemon_goes_live_when_it_arrives(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    daemon = Daemon(short_tmp)
    proc = daemon.python(FULL_RUN, "wait", stdin=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdin is not None
    run_id = proc.stdout.readline().strip()
    assert proc.stdout.readline().strip() == "waiting"
    daemon.start()
    try:
        wait_for(lambda: daemon.ctl_json("list"), what="the spool to be replayed")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.split() == ["live"]
        assert_whole_history(daemon, run_id, proc.pid)
    finally:
        daemon.stop()


def test_client_killed_while_spooling_is_replayed_then_marked_crashed(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Its spooled history is applied first; then, its process gone in this boot while
    unwatched, the reconciler calls it crashed (SPEC §2: it exited on its own)."""
    daemon = Daemon(short_tmp)
    proc = daemon.python(FULL_RUN, "wait", stdin=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    assert proc.stdout.readline().strip() == "waiting"
    proc.kill()
    proc.communicate(timeout=30)
    daemon.start()
    try:
        run = daemon.ctl_json("show", run_id)
        assert run["state"] == "failed_crash"
        assert run["failure"]["failure_class"] == "ProcessExited"
        assert run["heartbeats"] == 5
        assert [t["to"] for t in run["transitions"]] == ["pending", "running", "failed_crash"]
    finally:
        daemon.stop()


WORKLOAD = textwrap.dedent("""
    import json, sys, time
    import runnerd_client as rd
    from runnerd_client.ids import new_key
    from runnerd_client.protocol import Succeed

    client = rd.connect()
    acked = []
    for n in range(int(sys.argv[2])):
        run = client.run("chaos", variation=f"{sys.argv[1]}-{n}", heartbeat_interval=3600)
        run.start()
        for _ in range(20):
            run.heartbeat()
            time.sleep(0.01)
        reply = client.emit(Succeed(key=new_key(), run_id=run.run_id)).result(60)
        acked.append([run.run_id, reply.get("ok") and not reply.get("spooled")])
    assert client.drain(60), "spool not delivered"
    print(json.dumps(acked))
""")


def test_daemon_sigkilled_under_load_loses_no_acknowledged_event(
    short_tmp: Path, procs: list[subprocess.Popen[str]]
) -> None:
    daemon = Daemon(short_tmp).start()
    clients = [daemon.python(WORKLOAD, str(n), "4") for n in range(16)]
    procs += clients  # reaped, their pipes closed, however the test ends
    try:
        for _ in range(3):
            wait_for(
                lambda: len(daemon.ctl_json("list", "--limit", "10000")) >= 4,
                what="clients to make progress",
            )
            daemon.stop(signal.SIGKILL)
            daemon.start()
        results = []
        for proc in clients:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert "Traceback" not in err
            results += json.loads(out)
        runs = {
            r["run_id"]: r
            for r in daemon.ctl_json("list", "--experiment", "chaos", "--limit", "10000")
        }
        assert len(runs) == len(results) == 64
        assert any(live for _, live in results)
        for run_id, _ in results:
            run = daemon.ctl_json("show", run_id)
            assert run["state"] == "succeeded", run
            assert run["heartbeats"] == 20
            assert [t["to"] for t in run["transitions"]] == ["pending", "running", "succeeded"]
        assert daemon.ctl_json("status")["counts"] == {"succeeded": 64}
    finally:
        daemon.stop()


def test_a_spool_cut_short_by_a_crash_ends_at_the_last_whole_frame() -> None:
    events = [Heartbeat(run_id="R", seq=n) for n in range(1, 4)] + [Succeed(key="k", run_id="R")]
    data = frame({"spool": 1, "pid": os.getpid()}) + b"".join(frame(request_map(e)) for e in events)
    whole = [req for req, _ in parse(data)]
    assert whole == [None, *events]
    cut = [req for req, _ in parse(data[:-3])]
    assert cut == [None, *events[:-1]]
