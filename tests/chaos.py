"""Fault injection under load: client processes run full lifecycles while the daemon is
SIGKILLed and restarted, SIGSTOPped and continued, and some clients are SIGKILLed.

Each client logs every event it emitted with whether the daemon acknowledged it live
or it went to the spool. Afterwards every logged event must be in the registry exactly
once, no run may be left active, and every run must end in its true state.

A test runs it small (tests/test_chaos.py); run it large as a script:

    python tests/chaos.py --clients 32 --daemon-kills 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from conftest import Daemon, wait_for  # noqa: E402

CLIENT = textwrap.dedent("""
    import json, os, sys, time
    import runnerd_client as rd
    from runnerd_client.ids import new_key
    from runnerd_client.protocol import Fail, Heartbeat, Start, Succeed

    log_path, runs, beats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    client = rd.connect()
    log = open(log_path, "a", buffering=1)

    def note(run_id, op, reply, **extra):
        live = bool(reply.get("ok")) and not reply.get("spooled")
        log.write(json.dumps({"run": run_id, "op": op, "live": live, **extra}) + "\\n")

    for n in range(runs):
        run = client.run("chaos", variation=f"{os.getpid()}-{n}", heartbeat_interval=3600)
        note(run.run_id, "create", {"ok": run.attempt is not None})
        note(run.run_id, "start", client.emit(Start(
            key=new_key(), run_id=run.run_id, heartbeat_timeout=1.0)).result(120))
        for seq in range(1, beats + 1):
            reply = client.emit(Heartbeat(run_id=run.run_id, seq=seq)).result(120)
            note(run.run_id, "heartbeat", reply, seq=seq)
            time.sleep(0.01)
        end = Succeed(key=new_key(), run_id=run.run_id) if n % 2 == 0 else Fail(
            key=new_key(), run_id=run.run_id, message="planned failure")
        note(run.run_id, end.op, client.emit(end).result(120))
    log.write(json.dumps({"done": client.drain(120)}) + "\\n")
""")


@dataclass
class Report:
    """What the chaos did and what it found; every count after `runs` must be zero."""

    clients: int
    daemon_kills: int
    client_kills: int
    stops: int
    runs: int = 0
    events_logged: int = 0
    events_acked_live: int = 0
    events_stored: int = 0
    seconds: float = 0.0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong_state: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_state)


def read_logs(root: Path) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
    """Events by run, and the runs of clients that finished (not killed)."""
    events: dict[str, list[dict[str, Any]]] = {}
    finished: set[str] = set()
    for path in sorted(root.glob("client-*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs = {e["run"] for e in lines if "run" in e}
        for event in lines:
            if "run" in event:
                events.setdefault(event["run"], []).append(event)
        if lines and lines[-1].get("done"):
            finished |= runs
    return events, finished


def expected_end(logged: list[dict[str, Any]]) -> str:
    """The state a run must end in: what its client reported, or a crash if it never did."""
    ops = [e["op"] for e in logged]
    if "succeed" in ops:
        return "succeeded"
    return "failed_crash"


def check_run(daemon: Daemon, run_id: str, logged: list[dict[str, Any]], finished: bool,
              report: Report) -> None:
    run = daemon.ctl_json("show", run_id)
    states = Counter(t["to"] for t in run["transitions"])
    if states["pending"] != 1 or sum(states[s] for s in states if s not in
                                     ("pending", "running", "lost")) != 1:
        report.duplicated.append(f"{run_id}: transitions {dict(states)}")
    beats = [e["seq"] for e in logged if e["op"] == "heartbeat"]
    if run["heartbeats"] < len(beats) or (finished and run["heartbeats"] != len(beats)):
        report.lost.append(f"{run_id}: {run['heartbeats']} heartbeats stored, "
                           f"{len(beats)} emitted")
    if run["state"] != expected_end(logged):
        report.wrong_state.append(f"{run_id}: {run['state']}, expected {expected_end(logged)}")
    report.events_stored += len(run["transitions"]) + run["heartbeats"]


def verify(daemon: Daemon, root: Path, report: Report) -> None:
    events, finished = read_logs(root)
    stored = {r["run_id"]: r for r in daemon.ctl_json("list", "--experiment", "chaos",
                                                      "--limit", "10000")}
    report.runs = len(events)
    for run_id, logged in events.items():
        report.events_logged += len(logged)
        report.events_acked_live += sum(1 for e in logged if e["live"])
        if run_id not in stored:
            report.lost.append(f"{run_id}: not in the registry")
            continue
        check_run(daemon, run_id, logged, run_id in finished, report)


def chaos_config(root: Path) -> None:
    config = root / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("spool_sweep_interval = 0.5\n")


def inject(daemon: Daemon, clients: list[subprocess.Popen[str]], actions: list[str],
           rng: random.Random, stop_seconds: float) -> None:
    """Do each action at a random moment while the clients work."""
    victims = iter(rng.sample(clients, actions.count("kill_client")))
    for action in actions:
        time.sleep(rng.uniform(0.05, 0.4))  # a random moment, not a wait for a condition
        if action == "kill_daemon":
            daemon.stop(signal.SIGKILL)
            daemon.start()
        elif action == "kill_client":
            next(victims).kill()
        else:
            assert daemon.proc is not None
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            time.sleep(stop_seconds)  # longer than the runs' 1 s heartbeat timeout
            os.kill(daemon.proc.pid, signal.SIGCONT)


def run_chaos(root: Path, *, clients: int = 8, runs: int = 3, beats: int = 15,
              daemon_kills: int = 2, client_kills: int = 2, stops: int = 1,
              stop_seconds: float = 1.5, seed: int = 0) -> Report:
    rng = random.Random(seed)
    report = Report(clients, daemon_kills, client_kills, stops)
    started = time.monotonic()
    chaos_config(root)
    daemon = Daemon(root).start()
    procs = [daemon.python(CLIENT, str(root / f"client-{i}.jsonl"), str(runs), str(beats))
             for i in range(clients)]
    try:
        actions = ["kill_daemon"] * daemon_kills + ["kill_client"] * client_kills + \
            ["stop"] * stops
        rng.shuffle(actions)
        inject(daemon, procs, actions, rng, stop_seconds)
        for proc in procs:
            proc.communicate(timeout=600)
        wait_for(lambda: not any(r["state"] in ("pending", "running", "lost") for r in
                                 daemon.ctl_json("list", "--limit", "10000")),
                 timeout=60, interval=0.2, what="every run to end")
        verify(daemon, root, report)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        daemon.stop()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="runs per client")
    parser.add_argument("--beats", type=int, default=20, help="heartbeats per run")
    parser.add_argument("--daemon-kills", type=int, default=20)
    parser.add_argument("--client-kills", type=int, default=4)
    parser.add_argument("--stops", type=int, default=2)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-", dir="/tmp") as name:
        report = run_chaos(Path(name), clients=args.clients, runs=args.runs, beats=args.beats,
                           daemon_kills=args.daemon_kills, client_kills=args.client_kills,
                           stops=args.stops, seed=args.seed)
    print(json.dumps({"seed": args.seed, **asdict(report), "clean": report.clean}, indent=2))
    sys.exit(0 if report.clean else 1)


if __name__ == "__main__":
    main()
