"""Reliability figures for runnerd: events acknowledged vs found under each fault, what a
frozen or missing daemon costs an experiment, and what the spool's fsync costs an event.

Runs tests/chaos.py with every fault at a moderate size (its own daemon in a temp folder).
Then one fresh daemon in a temp folder (`spool_sweep_interval = 1`) and client
processes that each run 1,000 steps of 1 ms of CPU work with a heartbeat after each step and
a succeed (a `with rd.run()` block), timed in the client: with no runnerd call at all, with
the live daemon, with no daemon, with the daemon SIGSTOPped once the run has started, and
with it SIGSTOPped before the client starts; each frozen run is then checked to land whole
once the daemon is SIGCONTed. Last, runnerd_client's Spool timed directly: appends alone,
each followed by fdatasync, batches of 100 per fdatasync, and a Reporter with no daemon
spooling heartbeats with its own batching, on the temp dir's disk and on tmpfs (/dev/shm).
Prints tables and cleans up. Not a test: it reports.

    python bench/bench_reliability.py [--quick]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Runnerd, arguments, session, temp_root, verdict

from runnerd_client.connection import Connection
from runnerd_client.ids import new_run_id
from runnerd_client.protocol import Get, Heartbeat, RunnerdError
from runnerd_client.reporter import Reporter
from runnerd_client.spool import Spool
from runnerd_client.spool_fallback import ACK_WAIT

CHAOS = Path(__file__).resolve().parent.parent / "tests" / "chaos.py"

GOAL_OVERHEAD, GOAL_FROZEN_END = 1.0, 5.0
BARE, FROZEN = "no runnerd call (own work only)", "daemon SIGSTOPped after start"

EXPERIMENT = textwrap.dedent("""
    import atexit, json, sys, time
    out = {}
    atexit.register(lambda: print(json.dumps({**out, "exited": time.time()}), flush=True))
    import runnerd_client as rd  # its at-exit handlers, registered later, run before ours

    bare, steps, step = sys.argv[1] == "bare", int(sys.argv[2]), float(sys.argv[3])

    def experiment(beat):
        for _ in range(steps):
            began = time.perf_counter()
            while time.perf_counter() - began < step:
                pass
            beat()

    def ready():
        print("started", flush=True)
        sys.stdin.readline()
        return time.time()

    began = time.time()
    if bare:
        set_up, go = time.time(), ready()
        experiment(lambda: None)
    else:
        with rd.run("bench-overhead", heartbeat_interval=3600) as run:
            out["run_id"] = run.run_id
            set_up, go = time.time(), ready()
            experiment(run.heartbeat)
    ended = time.time()
    out.update(set_up=set_up - began, block=ended - go, ended=ended)
""")


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    chaos: tuple[str, ...]  # tests/chaos.py's options
    repeat: int  # client runs per situation (median kept)
    steps: int = 1_000
    step: float = 0.001
    spooled: int = 2_000  # events per spool pattern
    sync_each: int = 500  # events appended with an fdatasync each


FULL = Plan(
    (
        "--clients",
        "16",
        "--runs",
        "3",
        "--beats",
        "20",
        "--daemon-kills",
        "5",
        "--client-kills",
        "4",
        "--stops",
        "2",
        "--freezes",
        "2",
        "--seed",
        "16",
    ),
    repeat=3,
)
QUICK = Plan(
    (
        "--clients",
        "4",
        "--runs",
        "2",
        "--beats",
        "10",
        "--daemon-kills",
        "2",
        "--client-kills",
        "2",
        "--stops",
        "1",
        "--freezes",
        "1",
        "--seed",
        "16",
    ),
    repeat=1,
    spooled=500,
    sync_each=100,
)


@dataclass
class Timing:
    """One client run, in seconds: create+start, the block after it less its own work
    (heartbeats and succeed), and from the block's end to the last at-exit handler."""

    set_up: float
    block: float
    own: float
    at_exit: float
    landed: str = ""

    @property
    def overhead(self) -> float:
        return self.set_up + self.block - self.own + self.at_exit


@dataclass
class Report:
    chaos: subprocess.CompletedProcess[str] | None = None
    clients: list[tuple[str, list[Timing]]] = field(default_factory=list)
    spool: list[tuple[str, str, int, float]] = field(default_factory=list)


def stage_chaos(plan: Plan, report: Report) -> None:
    """tests/chaos.py, every fault in turn on a daemon of its own; it exits 0 if clean."""
    print("chaos: every fault", file=sys.stderr, flush=True)
    report.chaos = subprocess.run(
        [sys.executable, str(CHAOS), *plan.chaos], capture_output=True, text=True
    )


# --- client overhead ---------------------------------------------------------------------


def start_daemon(root: Path) -> Runnerd:
    daemon = Runnerd(root)
    daemon.config.parent.mkdir(parents=True)
    daemon.config.write_text("spool_sweep_interval = 1\n")
    return daemon.start(20.0)


def client(
    env: dict[str, str], plan: Plan, bare: bool, after_start: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Run the experiment once; `after_start` is called once its run has started."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            EXPERIMENT,
            "bare" if bare else "rd",
            str(plan.steps),
            str(plan.step),
        ],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    after_start()
    out, _ = proc.communicate("go\n", timeout=300)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def landed(sock: Path, run_id: str, beats: int, timeout: float = 60.0) -> str:
    """Whether the run reached the registry whole: succeeded with every heartbeat."""
    deadline, run = time.monotonic() + timeout, dict[str, Any]()
    while time.monotonic() < deadline:
        try:
            conn = Connection(sock, timeout=5)
            try:
                run = conn.call(Get(run=run_id))["run"]
            finally:
                conn.close()
        except RunnerdError:  # unknown_run until its spool lands, or the daemon away
            run = {}
        if run.get("state") == "succeeded" and run.get("heartbeats") == beats:
            break
        time.sleep(0.1)  # polling the registry
    return f"{run.get('state', 'missing')}, {run.get('heartbeats', 0)} heartbeats"


def timing(out: dict[str, Any], plan: Plan) -> Timing:
    """Own work is the steps' nominal length: whatever the client library's threads take
    from the experiment's steps counts as overhead."""
    return Timing(
        set_up=out["set_up"],
        block=out["block"],
        own=plan.steps * plan.step,
        at_exit=out["exited"] - out["ended"],
    )


def stage_clients(plan: Plan, root: Path, report: Report) -> None:
    daemon = start_daemon(root / "live")
    live = daemon.env
    (root / "none").mkdir(mode=0o700)
    nowhere = Runnerd(root / "none").env
    shm = Path(tempfile.mkdtemp(prefix="rdb-", dir="/dev/shm"))
    nowhere_shm = {**nowhere, "RUNNERD_DB": str(shm / "state" / "reg.db")}

    def freeze() -> None:
        os.kill(daemon.pid, signal.SIGSTOP)

    def thaw() -> None:
        os.kill(daemon.pid, signal.SIGCONT)

    def nothing() -> None:
        pass

    try:
        for label, env, bare, after_start in (
            (BARE, live, True, nothing),
            ("live daemon", live, False, nothing),
            ("no daemon (socket absent)", nowhere, False, nothing),
            ("no daemon, spool on tmpfs", nowhere_shm, False, nothing),
            (FROZEN, live, False, freeze),
        ):
            runs = []
            for _ in range(plan.repeat):
                try:
                    out = client(env, plan, bare, after_start)
                finally:
                    thaw()
                runs.append(timing(out, plan))
                if not bare and env is live:
                    runs[-1].landed = landed(daemon.socket, out["run_id"], plan.steps)
            report.clients.append((label, runs))
        runs = []
        for _ in range(plan.repeat):
            freeze()
            try:
                out = client(live, plan, False)
            finally:
                thaw()
            runs.append(timing(out, plan))
            runs[-1].landed = landed(daemon.socket, out["run_id"], plan.steps)
        report.clients.append(("daemon SIGSTOPped before create", runs))
    finally:
        thaw()
        daemon.stop()
        shutil.rmtree(shm, ignore_errors=True)


# --- the spool's fsync ---------------------------------------------------------------------


def per_event(spool: Spool, count: int, sync_every: int) -> float:
    """Seconds per event to append `count` heartbeats, with an fdatasync every `sync_every`
    (0: none), and the last one synced."""
    run_id = new_run_id()
    began = time.perf_counter()
    for seq in range(1, count + 1):
        spool.append(Heartbeat(run_id=run_id, seq=seq))
        if sync_every and seq % sync_every == 0:
            spool.sync()
    if sync_every:
        spool.sync()
    elapsed = time.perf_counter() - began
    spool.remove()
    return elapsed / count


def through_reporter(folder: Path, count: int) -> float:
    """Seconds per heartbeat a Reporter with no daemon spools, its futures all resolved
    (each SPOOLED only once its batch is fdatasync'd)."""
    reporter = Reporter(folder / "absent" / "rd.sock", spool_dirs=[folder / "reporter"])
    run_id = new_run_id()
    began = time.perf_counter()
    futures = [reporter.emit(Heartbeat(run_id=run_id, seq=seq)) for seq in range(1, count + 1)]
    wait(futures, timeout=600)
    return (time.perf_counter() - began) / count


def stage_spool(plan: Plan, root: Path, report: Report) -> None:
    logging.getLogger("runnerd_client").setLevel(logging.ERROR)  # "runnerd is away"
    with tempfile.TemporaryDirectory(prefix="rdb-", dir="/dev/shm") as shm:
        for disk, folder in (
            (f"{root.parent} (temp dir's disk)", root / "spool"),
            ("/dev/shm (tmpfs)", Path(shm)),
        ):
            spool = Spool([folder / "direct"])
            for label, count, every in (
                ("append, no fdatasync", plan.spooled, 0),
                ("append + fdatasync each", plan.sync_each, 1),
                ("append, fdatasync per 100", plan.spooled, 100),
            ):
                report.spool.append((disk, label, count, per_event(spool, count, every)))
            report.spool.append(
                (
                    disk,
                    "Reporter.emit, no daemon (its batches)",
                    plan.spooled,
                    through_reporter(folder, plan.spooled),
                )
            )


# --- output --------------------------------------------------------------------------------


def print_clients(plan: Plan, report: Report) -> None:
    print(
        f"\nClient wall time: {plan.steps:,} steps of {plan.step * 1e3:.0f} ms CPU work, a "
        f"heartbeat after each, then succeed (median of {plan.repeat}; ACK_WAIT "
        f"{ACK_WAIT} s)"
    )
    print(
        f"{'situation':<34} {'create+start':>12} {'body':>6} {'body-own':>8} {'at exit':>7} "
        f"{'total-own':>9} {'overhead':>8}  landed (after SIGCONT)"
    )
    medians = {
        label: sorted(runs, key=lambda t: t.overhead)[len(runs) // 2]
        for label, runs in report.clients
    }
    base = medians[BARE].overhead if BARE in medians else 0.0
    for label, mid in medians.items():
        print(
            f"{label:<34} {mid.set_up:>12.3f} {mid.block:>6.3f} {mid.block - mid.own:>8.3f} "
            f"{mid.at_exit:>7.3f} {mid.overhead:>9.3f} {mid.overhead - base:>8.3f}  "
            f"{mid.landed}"
        )
    if FROZEN in medians:
        total = medians[FROZEN].overhead
        print(
            f"target: overhead with the daemon frozen mid-run < {GOAL_OVERHEAD:.0f} s: "
            f"{total - base:.2f} s {verdict(total - base < GOAL_OVERHEAD)}; ends within "
            f"{GOAL_FROZEN_END:.0f} s of its own work: {total:.2f} s "
            f"{verdict(total < GOAL_FROZEN_END)}"
        )
    print(
        "(seconds; create+start: before the block's body; body: the steps, heartbeats and "
        "succeed; own: the steps' nominal CPU work; at exit: runnerd_client's at-exit "
        "handlers; total-own: create+start + body-own + at exit; overhead: total-own less "
        "that of the run with no runnerd call, what the machine's load alone costs)"
    )


def print_spool(report: Report) -> None:
    print("\nSpool: time per spooled heartbeat")
    print(f"{'disk':<34} {'pattern':<40} {'events':>6} {'us/event':>9}")
    for disk, label, count, seconds in report.spool:
        print(f"{disk:<34} {label:<40} {count:>6} {seconds * 1e6:>9.1f}")


def main() -> None:
    parser = arguments(__doc__, "4 clients per fault, one client run per situation (~2 min)")
    parser.add_argument("--skip-chaos", action="store_true", help="only the client stages")
    args = parser.parse_args()
    bench = session(args)
    plan = QUICK if args.quick else FULL
    report = Report()
    with temp_root() as root:
        if not args.skip_chaos:
            stage_chaos(plan, report)
        stage_clients(plan, root, report)
        stage_spool(plan, root, report)
    bench.stop()
    bench.header("reliability", "quick" if args.quick else "full")
    if report.chaos is not None:
        print(
            f"\nEvents acknowledged vs found, per fault (python tests/chaos.py "
            f"{' '.join(plan.chaos)}):"
        )
        print(report.chaos.stdout.rstrip() or report.chaos.stderr[-3000:])
        print(
            f"target: every acknowledged event found once: {verdict(report.chaos.returncode == 0)}"
        )
    print_clients(plan, report)
    print_spool(report)


if __name__ == "__main__":
    main()
