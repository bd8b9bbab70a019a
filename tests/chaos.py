"""Fault injection under load: client processes run full lifecycles while one fault at a time
hits them, each fault in its own phase (its own experiment) on one daemon:

- daemon_kill: the daemon SIGKILLed and restarted at random moments;
- short_stop: the daemon SIGSTOPped for less than the clients' ACK_WAIT (but longer than the
  runs' heartbeat timeout), then SIGCONTed;
- client_kill: clients SIGKILLed mid-run;
- frozen_killed: the daemon SIGSTOPped past the clients' ACK_WAIT, then SIGKILLed and
  restarted (what systemd's watchdog does);
- disk_full: the registry's disk (a small tmpfs) filled, a client SIGKILLed with events
  spooled meanwhile, then freed (needs root; skipped with the reason where mounting fails);
- fork: clients fork inside their runs, the child exiting with os._exit(0) or sys.exit(0)
  in the with-block, and the daemon SIGKILLed once meanwhile (children forked while the
  parent spools);
- startup_deaths: the daemon down while clients spool; as it starts, half the clients are
  SIGKILLed and the others end their runs into the spool and exit.

Every client logs each event's outcome: acknowledged live, spooled (safe on disk) or
refused. Afterwards every acknowledged event must be in the registry exactly once, no run
may be left active and no spool undelivered, and every run must end in its true state:
what its client reported, or `failed_crash` (never `Interrupted`) if it died first.

A test runs it small (tests/test_chaos.py); run it large as a script:

    python tests/chaos.py --clients 32 --runs 5 --daemon-kills 20
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
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from test_storage_faults import fill

from conftest import Daemon, wait_for
from runnerd_client.connection import Connection
from runnerd_client.protocol import Get, ListRuns

ACTIVE = ("pending", "running", "lost")
PLANNED = "planned failure"

CLIENT = textwrap.dedent("""
    import json, os, random, sys, threading, time
    import runnerd_client as rd
    from runnerd_client.ids import new_key
    from runnerd_client.protocol import Checkpoint, Fail, Heartbeat, Start, Succeed

    log_path, experiment, mode, gate = sys.argv[1:5]
    runs, beats, beat_timeout, spread = int(sys.argv[5]), int(sys.argv[6]), \\
        float(sys.argv[7]), float(sys.argv[8])
    client = rd.connect()
    log = open(log_path, "a", buffering=1)
    lock = threading.Lock()
    me = os.getpid()

    def note(**entry):
        if os.getpid() == me:  # a forked child logs nothing
            with lock:
                log.write(json.dumps(entry) + "\\n")

    def logged(req, future):
        reply = future.result()
        note(run=req.run_id, op=req.op, seq=getattr(req, "seq", None),
             ok=bool(reply.get("ok")), spooled=bool(reply.get("spooled")),
             code=(reply.get("error") or {}).get("code"))

    emit = client.emit
    def logging_emit(req):
        future = emit(req)
        future.add_done_callback(lambda f: logged(req, f))
        return future
    client.emit = logging_emit  # every event, the with-block's included

    def until_gate(beat):
        while not os.path.exists(gate):
            beat()
            time.sleep(0.01)
        time.sleep(random.uniform(0, spread))

    def plain(n, last):
        run = client.run(experiment, variation=f"{me}-{n}", heartbeat_interval=3600)
        client.emit(Start(key=new_key(), run_id=run.run_id, heartbeat_timeout=beat_timeout))
        seq = 0
        def beat():
            nonlocal seq
            seq += 1
            client.emit(Heartbeat(run_id=run.run_id, seq=seq))
        for _ in range(beats):
            beat()
            time.sleep(0.01)
        if last:
            until_gate(beat)
        client.emit(Checkpoint(key=new_key(), run_id=run.run_id, data={"n": n}))
        end = Succeed(key=new_key(), run_id=run.run_id) if n % 2 == 0 else Fail(
            key=new_key(), run_id=run.run_id, message="planned failure")
        client.wait(client.emit(end), end.op)

    def forking(n, last):
        try:
            with client.run(experiment, variation=f"{me}-{n}", heartbeat_interval=3600,
                            heartbeat_timeout=beat_timeout) as run:
                for k in range(beats):
                    run.heartbeat()
                    time.sleep(0.01)
                    if k == beats // 2:
                        began = time.monotonic()
                        child = os.fork()
                        if child == 0:
                            if n % 2:
                                os._exit(0)
                            sys.exit(0)  # leaves the with-block in the child
                        os.waitpid(child, 0)
                        note(child_exit=time.monotonic() - began)
                if last:
                    until_gate(run.heartbeat)
                run.checkpoint({"n": n})
                if n % 2:
                    raise ValueError("planned failure")
        except ValueError:
            pass

    for n in range(runs):
        (forking if mode == "fork" else plain)(n, n == runs - 1)
    note(done=client.drain(120))
""")


@dataclass(frozen=True)
class Plan:
    """How hard each fault hits; `ack_wait` is the clients' RUNNERD_ACK_WAIT."""

    clients: int = 8
    runs: int = 3
    beats: int = 15
    daemon_kills: int = 2
    client_kills: int = 2
    stops: int = 1
    freezes: int = 1
    ack_wait: float = 2.0
    seed: int = 0

    @property
    def beat_timeout(self) -> float:
        """The runs' heartbeat timeout: a short stop outlasts it, so the daemon's watchdog
        acts on runs whose heartbeats are only late."""
        return self.ack_wait / 2


@dataclass
class FaultResult:
    """One fault's figures: acknowledged events (live or spooled) and how many were found;
    every list must be empty."""

    fault: str
    clients: int = 0
    runs: int = 0
    acked_live: int = 0
    acked_spooled: int = 0
    found: int = 0
    seconds: float = 0.0
    child_exit_max: float = 0.0
    skipped: str = ""
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong_state: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return self.acked_live + self.acked_spooled

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_state or self.refused or self.stuck)


@dataclass
class Report:
    """Every fault's result, in the order they ran."""

    plan: Plan
    faults: list[FaultResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return all(f.clean for f in self.faults)

    def fault(self, name: str) -> FaultResult:
        return next(f for f in self.faults if f.fault == name)


class ChaosDaemon(Daemon):
    """The test daemon, with a temp dir of its own (the spool's last fallback folder is
    shared by every daemon of the user otherwise)."""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "TMPDIR": str(self.root / "tmp")}

    @property
    def spool_folders(self) -> list[Path]:
        return [
            self.db.parent / "spool",
            self.socket.parent / "spool",
            self.root / "tmp" / f"runnerd-spool-{os.getuid()}",
        ]

    def spools(self, pattern: str = "*") -> list[Path]:
        return [p for folder in self.spool_folders for p in folder.glob(f"{pattern}.spool")]

    def registry(self) -> Connection:
        return Connection(self.socket, timeout=30)


# --- the logs and the registry ---------------------------------------------------------


def read_logs(folder: Path) -> tuple[dict[str, list[dict[str, Any]]], set[str], list[float]]:
    """Events by run, the runs of clients that finished (not killed), and how long each
    forked child took to exit. A line cut by a SIGKILL is skipped."""
    events: dict[str, list[dict[str, Any]]] = {}
    finished: set[str] = set()
    child_exits: list[float] = []
    for path in sorted(folder.glob("client-*.jsonl")):
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        for event in lines:
            if "run" in event:
                events.setdefault(event["run"], []).append(event)
            child_exits += [event["child_exit"]] if "child_exit" in event else []
        if lines and "done" in lines[-1]:
            finished |= {e["run"] for e in lines if "run" in e}
    return events, finished, child_exits


def check_run(
    run: dict[str, Any], logged: list[dict[str, Any]], finished: bool, result: FaultResult
) -> None:
    """Count the run's acknowledged events found in the registry; note what is missing,
    doubled or in a wrong state."""
    run_id = run["run_id"]
    acked = [e for e in logged if e["ok"]]
    result.refused += [f"{run_id}: {e['op']} refused ({e['code']})" for e in logged if not e["ok"]]
    sent = Counter(e["op"] for e in acked)
    states = Counter(t["to"] for t in run["transitions"])
    ends = sum(n for s, n in states.items() if s not in ACTIVE)
    if states["pending"] != 1 or ends != 1:
        result.duplicated.append(f"{run_id}: transitions {dict(states)}")
    failure = run.get("failure") or {}
    found = Counter(
        {
            "create": 1,
            "start": min(1, states["running"]),
            "heartbeat": min(sent["heartbeat"], run["heartbeats"]),
            "checkpoint": min(sent["checkpoint"], len(run["checkpoints"])),
            "succeed": int(run["state"] == "succeeded"),
            "fail": int(
                run["state"] == "failed_crash" and PLANNED in (failure.get("message") or "")
            ),
        }
    )
    for op, count in sent.items():
        result.found += min(count, found[op])
        if found[op] < count:
            result.lost.append(f"{run_id}: {op}: {count} acknowledged, {found[op]} found")
    if finished and (
        run["heartbeats"] != sent["heartbeat"] or len(run["checkpoints"]) != sent["checkpoint"]
    ):
        result.duplicated.append(
            f"{run_id}: {run['heartbeats']} heartbeats and "
            f"{len(run['checkpoints'])} checkpoints stored, "
            f"{sent['heartbeat']} and {sent['checkpoint']} acknowledged"
        )
    expected = "succeeded" if sent["succeed"] else "failed_crash"
    if run["state"] != expected:
        result.wrong_state.append(f"{run_id}: {run['state']}, expected {expected}")
    elif not sent["succeed"] and not sent["fail"] and failure.get("failure_class") == "Interrupted":
        result.wrong_state.append(f"{run_id}: Interrupted, but its client died in this boot")


def verify(daemon: ChaosDaemon, folder: Path, experiment: str, result: FaultResult) -> None:
    events, finished, child_exits = read_logs(folder)
    result.runs = len(events)
    result.child_exit_max = round(max(child_exits, default=0.0), 2)
    for logged in events.values():
        result.acked_live += sum(1 for e in logged if e["ok"] and not e["spooled"])
        result.acked_spooled += sum(1 for e in logged if e["ok"] and e["spooled"])
    conn = daemon.registry()
    try:
        stored = {
            r["run_id"] for r in conn.call(ListRuns(experiment=experiment, limit=10_000))["runs"]
        }
        for run_id, logged in events.items():
            if run_id not in stored:
                acked = sum(1 for e in logged if e["ok"])
                result.lost.append(f"{run_id}: not in the registry ({acked} acknowledged)")
                continue
            check_run(conn.call(Get(run=run_id))["run"], logged, run_id in finished, result)
    finally:
        conn.close()


def settled(daemon: ChaosDaemon, experiment: str) -> bool:
    """No run of the experiment active, no spool left undelivered."""
    conn = daemon.registry()
    try:
        runs = conn.call(ListRuns(experiment=experiment, limit=10_000))["runs"]
    finally:
        conn.close()
    return not daemon.spools() and not any(r["state"] in ACTIVE for r in runs)


# --- the faults ----------------------------------------------------------------------------


@contextmanager
def small_tmpfs(mount: Path, size: str = "64m") -> Iterator[str]:
    """A private tmpfs on the new folder `mount`; yields why not ("" if mounted)."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    try:
        yield "" if done.returncode == 0 else f"cannot mount a tmpfs: {done.stderr.strip()}"
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@dataclass
class Phase:
    """One fault's clients, while it is injected."""

    chaos: Chaos
    fault: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.chaos.root / self.fault

    @property
    def gate(self) -> Path:
        """Once it exists the clients end their last run (they beat until then)."""
        return self.folder / "gate"

    @property
    def experiment(self) -> str:
        return f"chaos-{self.fault}"

    def spawn(self, mode: str = "plain", spread: float = 0.0) -> None:
        plan = self.chaos.plan
        self.folder.mkdir()
        for i in range(plan.clients):
            self.procs.append(
                self.chaos.daemon.python(
                    CLIENT,
                    str(self.log(i)),
                    self.experiment,
                    mode,
                    str(self.gate),
                    str(plan.runs),
                    str(plan.beats),
                    str(plan.beat_timeout),
                    str(spread),
                    env={"RUNNERD_ACK_WAIT": str(plan.ack_wait)},
                )
            )

    def log(self, client: int) -> Path:
        return self.folder / f"client-{client}.jsonl"

    def logged(self, text: str, count: int = 1) -> bool:
        """Whether every client's log holds `text` `count` times."""
        logs = [self.log(i) for i in range(len(self.procs))]
        return all(p.exists() and p.read_text().count(text) >= count for p in logs)

    def working(self) -> None:
        """Wait until every client has an event acknowledged: faults hit busy clients."""
        wait_for(lambda: self.logged('"op"'), timeout=60, what="every client to report")

    def moment(self) -> None:
        time.sleep(self.chaos.rng.uniform(0.05, 0.4))  # a random moment, not a wait

    def kill_clients(self, count: int) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        for victim in self.chaos.rng.sample(alive, min(count, len(alive))):
            self.moment()
            victim.kill()

    def stop(self, seconds: float) -> None:
        """SIGSTOP the daemon for `seconds`."""
        assert self.chaos.daemon.proc is not None
        os.kill(self.chaos.daemon.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)  # the fault's length

    def cont(self) -> None:
        assert self.chaos.daemon.proc is not None
        os.kill(self.chaos.daemon.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.chaos.daemon.stop(signal.SIGKILL)
        self.chaos.start_daemon()


def daemon_kill(phase: Phase) -> None:
    phase.spawn()
    phase.working()
    for _ in range(phase.chaos.plan.daemon_kills):
        phase.moment()
        phase.restart()


def short_stop(phase: Phase) -> None:
    phase.spawn()
    phase.working()
    for _ in range(phase.chaos.plan.stops):
        phase.moment()
        phase.stop(phase.chaos.plan.ack_wait * 0.75)
        phase.cont()


def client_kill(phase: Phase) -> None:
    phase.spawn()
    phase.working()
    phase.kill_clients(phase.chaos.plan.client_kills)


def frozen_killed(phase: Phase) -> None:
    phase.spawn()
    phase.working()
    for _ in range(phase.chaos.plan.freezes):
        phase.moment()
        phase.stop(phase.chaos.plan.ack_wait * 2)
        phase.restart()


def disk_full(phase: Phase) -> None:
    """The registry's disk full; a client dies with events in its spool meanwhile (the
    daemon must keep them until they land, and retry marking the run crashed)."""
    phase.spawn()
    phase.working()
    phase.moment()
    filler = fill(phase.chaos.daemon.db.parent, 0)
    began = time.monotonic()
    victim = phase.chaos.rng.randrange(len(phase.procs))
    wait_for(
        lambda: '"spooled": true' in phase.log(victim).read_text(),
        timeout=60,
        what="the victim to spool",
    )
    phase.procs[victim].kill()
    time.sleep(max(0.0, began + phase.chaos.plan.ack_wait * 1.5 - time.monotonic()))
    filler.unlink()


def fork(phase: Phase) -> None:
    phase.spawn("fork")
    phase.working()
    phase.moment()
    phase.chaos.daemon.stop(signal.SIGKILL)
    time.sleep(phase.chaos.plan.ack_wait)  # away long enough for forks while spooling
    phase.chaos.start_daemon()


def startup_deaths(phase: Phase) -> None:
    """The daemon down while every client spools; as it starts, half the clients are
    SIGKILLed and the others end their runs (into the spool, mostly) and exit, at random
    moments across a start's length."""
    chaos = phase.chaos
    spread = max(chaos.start_seconds, 0.2)
    phase.spawn(spread=spread)
    wait_for(
        lambda: phase.logged('"op": "start"', chaos.plan.runs),
        timeout=120,
        what="every client in its last run",
    )
    chaos.daemon.stop(signal.SIGKILL)
    wait_for(
        lambda: all(chaos.daemon.spools(f"{p.pid}-*") for p in phase.procs),
        timeout=60,
        what="every client to spool",
    )
    victims = chaos.rng.sample(phase.procs, len(phase.procs) // 2)
    moments = sorted(chaos.rng.uniform(0, spread) for _ in victims)
    phase.gate.touch()
    starter = threading.Thread(target=chaos.start_daemon)
    began = time.monotonic()
    starter.start()
    for victim, at in zip(victims, moments, strict=True):
        time.sleep(max(0.0, began + at - time.monotonic()))  # the chosen moment
        victim.kill()
    starter.join()


FAULTS: dict[str, Callable[[Phase], None]] = {
    "daemon_kill": daemon_kill,
    "short_stop": short_stop,
    "client_kill": client_kill,
    "frozen_killed": frozen_killed,
    "disk_full": disk_full,
    "fork": fork,
    "startup_deaths": startup_deaths,
}
WHAT = {
    "daemon_kill": "daemon SIGKILLed and restarted at random moments",
    "short_stop": "daemon SIGSTOPped for 0.75 x ACK_WAIT (past the runs' heartbeat "
    "timeout), then SIGCONT",
    "client_kill": "clients SIGKILLed mid-run",
    "frozen_killed": "daemon SIGSTOPped for 2 x ACK_WAIT, then SIGKILLed and restarted "
    "(a watchdog)",
    "disk_full": "registry's tmpfs filled for 1.5 x ACK_WAIT, a client SIGKILLed with "
    "events spooled meanwhile, then freed",
    "fork": "clients fork in their runs (child os._exit(0) or sys.exit(0) in the "
    "with-block); daemon SIGKILLed once, down ACK_WAIT",
    "startup_deaths": "daemon down while clients spool; as it starts, half the clients "
    "SIGKILLed, half end their runs and exit",
}


# --- running it ----------------------------------------------------------------------------


@dataclass
class Chaos:
    root: Path
    plan: Plan
    rng: random.Random
    daemon: ChaosDaemon
    start_seconds: float = 0.0

    def start_daemon(self) -> None:
        began = time.monotonic()
        self.daemon.start()
        self.start_seconds = time.monotonic() - began

    def run(self, fault: str) -> FaultResult:
        result = FaultResult(fault, clients=self.plan.clients)
        phase = Phase(self, fault)
        began = time.monotonic()
        try:
            FAULTS[fault](phase)
            phase.gate.touch()
            for proc in phase.procs:
                self._finish(proc, result)
            try:
                wait_for(
                    lambda: settled(self.daemon, phase.experiment),
                    timeout=120,
                    interval=0.1,
                    what="every run to end and every spool to land",
                )
            except pytest.fail.Exception as exc:
                result.stuck.append(str(exc))
            verify(self.daemon, phase.folder, phase.experiment, result)
        finally:
            for proc in phase.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        result.seconds = round(time.monotonic() - began, 1)
        return result

    @staticmethod
    def _finish(proc: subprocess.Popen[str], result: FaultResult) -> None:
        """Wait for a client; one that hangs or dies of an error (not a SIGKILL) is stuck."""
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            result.stuck.append(f"client {proc.pid} still running after 300 s")
            return
        if proc.returncode not in (0, -signal.SIGKILL) or "Traceback" in err:
            result.stuck.append(f"client {proc.pid} exited {proc.returncode}: {err[-2000:]}")


def run_chaos(root: Path, plan: Plan = Plan(), faults: tuple[str, ...] = tuple(FAULTS)) -> Report:
    """Each fault in turn on one daemon under `root` (a short path)."""
    report = Report(plan)
    started = time.monotonic()
    config = root / "config" / "runnerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("spool_sweep_interval = 0.5\n")
    (root / "tmp").mkdir()
    chaos = Chaos(root, plan, random.Random(plan.seed), ChaosDaemon(root))
    disk: AbstractContextManager[str] = (
        small_tmpfs(chaos.daemon.db.parent) if "disk_full" in faults else nullcontext("")
    )
    with disk as no_disk:
        chaos.start_daemon()
        try:
            for fault in faults:
                if fault == "disk_full" and no_disk:
                    report.faults.append(FaultResult(fault, skipped=no_disk))
                    continue
                report.faults.append(chaos.run(fault))
        finally:
            chaos.daemon.stop()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def print_report(report: Report) -> None:
    print(
        f"{'fault':<15} {'runs':>5} {'acked live':>10} {'spooled':>8} {'found':>7} "
        f"{'lost':>5} {'dup':>4} {'wrong':>5} {'refused':>7} {'s':>6}  what"
    )
    for f in report.faults:
        if f.skipped:
            print(f"{f.fault:<15} skipped: {f.skipped}")
            continue
        print(
            f"{f.fault:<15} {f.runs:>5} {f.acked_live:>10} {f.acked_spooled:>8} "
            f"{f.found:>7} {len(f.lost):>5} {len(f.duplicated):>4} {len(f.wrong_state):>5} "
            f"{len(f.refused):>7} {f.seconds:>6.1f}  {WHAT[f.fault]}"
        )
    for f in report.faults:
        for problem in [*f.lost, *f.duplicated, *f.wrong_state, *f.refused, *f.stuck][:20]:
            print(f"  {f.fault}: {problem}")
    fork = next((f for f in report.faults if f.fault == "fork" and not f.skipped), None)
    if fork:
        print(f"longest a forked child took to exit: {fork.child_exit_max:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Plan()
    parser.add_argument("--clients", type=int, default=32, help="clients per fault")
    parser.add_argument("--runs", type=int, default=5, help="runs per client")
    parser.add_argument("--beats", type=int, default=20, help="heartbeats per run (at least)")
    parser.add_argument("--daemon-kills", type=int, default=20)
    parser.add_argument("--client-kills", type=int, default=4)
    parser.add_argument("--stops", type=int, default=2)
    parser.add_argument("--freezes", type=int, default=2)
    parser.add_argument(
        "--ack-wait", type=float, default=defaults.ack_wait, help="the clients' RUNNERD_ACK_WAIT"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default: all of {', '.join(FAULTS)})",
    )
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    args = parser.parse_args()
    plan = replace(
        defaults,
        clients=args.clients,
        runs=args.runs,
        beats=args.beats,
        daemon_kills=args.daemon_kills,
        client_kills=args.client_kills,
        stops=args.stops,
        freezes=args.freezes,
        ack_wait=args.ack_wait,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="chaos-", dir="/tmp") as name:
        report = run_chaos(Path(name), plan, tuple(args.faults.split(",")))
    if args.json:
        print(json.dumps({**asdict(report), "clean": report.clean}, indent=2))
    else:
        print(
            f"seed {plan.seed}, {plan.clients} clients x {plan.runs} runs per fault, "
            f"ACK_WAIT {plan.ack_wait} s, {report.seconds} s"
        )
        print_report(report)
    sys.exit(0 if report.clean else 1)


if __name__ == "__main__":
    main()
