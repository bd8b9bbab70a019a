"""Liveness figures for runnerd: death detection, the idle cost of many timers, restart at scale.

Starts fresh daemons in a temp folder, drives them from forked client processes that use
`runnerd_client`, builds a large registry through the registry's own Store, prints tables
and cleans up. Not a test: it asserts nothing, it reports.

    python bench/bench_liveness.py [--quick]
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from harness import (
    CLK_TCK,
    RUNNERCTL,
    Idle,
    Kill,
    Quiet,
    Runnerd,
    arguments,
    fillers,
    forked,
    kill_and_watch,
    pct,
    pct_row,
    registry,
    sample_idle,
    session,
    temp_root,
    verdict,
)

import runnerd_client as rd
from runnerd.registry import NewRun, RunUpdate, Store
from runnerd.states import failure_record
from runnerd_client import procinfo
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Create, Get, ListRuns, Request, Start, State

RECOVERED = re.compile(r"recovered (\d+) active runs \((\d+) live processes\) in ([\d.]+) s")


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    kills: int
    held_runs: int
    registry_runs: int
    registry_running: int
    idle_seconds: float = 10.0
    kill_batch: int = 10
    live_running: int = 10
    fill_procs: int = 4
    fill_window: int = 64
    hangs: int = 5  # stopped and stalled commands each, all at once


FULL = Plan(kills=100, held_runs=100_000, registry_runs=1_000_000, registry_running=10_000)
QUICK = Plan(
    kills=20, held_runs=10_000, registry_runs=100_000, registry_running=1_000, idle_seconds=5.0
)


# --- stage 1: death detection ---------------------------------------------------


def victim(sock: Path, first: int, index: int, _barrier: Any) -> tuple[int, str]:
    """A client process: create and start a run with the client library (then wait to die)."""
    run = (
        rd.connect(sock)
        .run("bench-liveness", f"victim-{first + index}", heartbeat_timeout=3600)
        .start()
    )
    return os.getpid(), run.run_id


def kill(conn: Connection, pid: int, run_id: str) -> Kill:
    state = conn.call(Get(run=run_id))["run"]["state"]
    if state != "running":
        raise RuntimeError(f"run {run_id} is {state} before the kill")
    return kill_and_watch(conn, pid, run_id)


def stage_kills(daemon: Runnerd, plan: Plan) -> list[Kill]:
    """SIGKILL `plan.kills` clients, one at a time, spawned in batches."""
    print(f"death detection: {plan.kills} SIGKILLs", file=sys.stderr, flush=True)
    kills: list[Kill] = []
    with daemon.connect() as conn:
        while len(kills) < plan.kills:
            batch = min(plan.kill_batch, plan.kills - len(kills))
            with forked(partial(victim, daemon.socket, len(kills)), batch, 60) as (victims, _):
                time.sleep(0.05)  # let the daemon settle after the batch's creates
                kills += [kill(conn, pid, run_id) for pid, run_id in victims]
    return kills


# --- stage 2: idle cost of many running runs ------------------------------------


def create_start(index: int, k: int) -> list[Request]:
    run_id = new_run_id()
    return [
        Create(
            key=new_key(),
            run_id=run_id,
            experiment="bench-hold",
            variation=f"h{index}-{k % 100}",
            params={"k": k},
        ),
        Start(key=new_key(), run_id=run_id, heartbeat_timeout=3600.0),
    ]


@dataclass
class Hold:
    """The hold stage: idle figures empty and full, and what filling and dying cost."""

    empty: Idle
    full: Idle | None = None
    fill_seconds: float = 0.0
    fill_errors: int = 0
    backlog_seconds: float = 0.0
    mass_death_seconds: float = float("nan")


def stage_hold(daemon: Runnerd, plan: Plan, quiet: Quiet) -> Hold:
    """Idle CPU/RSS empty, then holding `plan.held_runs` running runs, then their holders die."""
    quiet.wait()
    hold = Hold(empty=sample_idle(daemon.pid, plan.idle_seconds, 0))
    print(f"holding {plan.held_runs} running runs", file=sys.stderr, flush=True)
    with fillers(
        daemon.socket, plan.held_runs, plan.fill_procs, plan.fill_window, create_start
    ) as (seconds, errors, release):
        hold.fill_seconds, hold.fill_errors = seconds, errors
        # A probe longer than sample_interval (5 s): the first rounds over new runs (their
        # first samples written, their files looked at) are a one-time cost, not idleness.
        hold.backlog_seconds = daemon.wait_idle(600.0, probe=6.0)
        running = daemon.counts().get("running", 0)
        quiet.wait()
        hold.full = sample_idle(daemon.pid, plan.idle_seconds, running)
        print("releasing the holders", file=sys.stderr, flush=True)
        hold.mass_death_seconds = time_mass_death(daemon, release)
    return hold


def time_mass_death(daemon: Runnerd, release: Any, timeout: float = 600.0) -> float:
    """Let every holder exit at once; seconds until no run is left running.

    Polls with a cheap indexed query every 20 ms (a `status` would count every run).
    """
    with daemon.connect() as conn:
        began = time.monotonic()
        release.set()
        while conn.call(ListRuns(state="running", limit=1), timeout=60)["runs"]:
            if time.monotonic() - began > timeout:
                return float("nan")
            time.sleep(0.02)
        return time.monotonic() - began


# --- stage 3: hung commands found from outside -----------------------------------


HANG_CONFIG = {"heartbeat_timeout": 5.0, "stall_timeout": 10.0, "sample_interval": 5.0}
WAIT = "import time\nprint('ready', flush=True)\ntime.sleep(3600)\n"
GO_QUIET = (
    "import time\nbusy = time.process_time() + 0.5\n"
    "while time.process_time() < busy:\n    pass\nprint('quiet', flush=True)\n"
    "time.sleep(3600)\n"
)


@dataclass
class Hangs:
    """Seconds from a command's stop (SIGSTOP) or its last sign of progress to `lost`."""

    stopped: list[float] = field(default_factory=list)
    stalled: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def command_of(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[int, str]:
    """The command runnerctl exec started, and its run id (from its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
            env = Path(f"/proc/{pid}/environ").read_bytes()
            return pid, env.split(b"RUNNERD_RUN_ID=")[1].split(b"\0")[0].decode()
        except (OSError, IndexError, ValueError):
            time.sleep(0.01)
    raise RuntimeError("runnerctl exec started no command")


def until_lost(
    conn: Connection, runs: dict[str, float], cause: str, timeout: float = 120.0
) -> dict[str, float]:
    """Poll every run until it is lost; seconds from its start time in `runs` (wall)."""
    found: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(runs) and time.monotonic() < deadline:
        for run_id, began in runs.items():
            if run_id not in found:
                run = conn.call(Get(run=run_id))["run"]
                if run["state"] == "lost":
                    found[run_id] = time.time() - began
                    if run["transitions"][-1]["cause"] != cause:
                        raise RuntimeError(f"{run_id} lost as {run['transitions'][-1]['cause']}")
        time.sleep(0.05)
    return found


def stage_hangs(root: Path, plan: Plan, quiet: Quiet) -> Hangs:
    """`plan.hangs` commands under runnerctl exec SIGSTOPped, and as many that go quiet
    after half a second of CPU; how long until each is lost, against its timeouts."""
    daemon = Runnerd(root)
    daemon.config.parent.mkdir(parents=True, exist_ok=True)
    daemon.config.write_text("".join(f"{k} = {v}\n" for k, v in HANG_CONFIG.items()))
    out, procs = Hangs(), []
    try:
        daemon.start(60.0)
        quiet.wait()
        print(
            f"hangs: {plan.hangs} stopped and {plan.hangs} stalled commands",
            file=sys.stderr,
            flush=True,
        )
        for code in [WAIT] * plan.hangs + [GO_QUIET] * plan.hangs:
            procs.append(
                subprocess.Popen(
                    [
                        *RUNNERCTL,
                        "exec",
                        "--experiment",
                        "bench-hang",
                        "--",
                        sys.executable,
                        "-c",
                        code,
                    ],
                    env=daemon.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        stopped, stalled = {}, {}
        for n, proc in enumerate(procs):
            assert proc.stdout is not None
            pid, run_id = command_of(proc)
            proc.stdout.readline()  # 'ready', or 'quiet' once its CPU is spent
            if n < plan.hangs:
                os.kill(pid, signal.SIGSTOP)
                stopped[run_id] = time.time()
            else:  # its last sign of progress: that line, in its stdout.log
                with daemon.connect() as conn:
                    folder = Path(conn.call(Get(run=run_id))["run"]["run_dir"])
                stalled[run_id] = (folder / "stdout.log").stat().st_mtime
        with daemon.connect() as conn:
            out.stopped = list(until_lost(conn, stopped, "stopped").values())
            out.stalled = list(until_lost(conn, stalled, "stalled").values())
    except RuntimeError as exc:
        out.problems.append(str(exc))
    finally:
        for proc in procs:  # its command dies with it (PR_SET_PDEATHSIG), stopped or not
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        daemon.stop()
    return out


# --- stage 4: restart with a large registry -------------------------------------


FAILURES = (
    ("RuntimeError", "CUDA out of memory. Tried to allocate {n} MiB"),
    ("ValueError", "loss is nan at step {n}"),
    ("KeyError", "missing column id_{n}"),
    ("TimeoutError", "rank {n} did not answer"),
    ("FileNotFoundError", "no checkpoint at /data/ckpt/{n}.pt"),
)
ENDS = {
    State.FAILED_CRASH: "crash",
    State.FAILED_ABANDONED: "abandoned",
    State.FAILED_TIMEOUT: "timeout",
}


@dataclass(frozen=True)
class Layout:
    """Which runs of the synthetic registry are in which state, and when they ran."""

    total: int
    running: int
    live: int
    now: float
    data: Path

    def state(self, i: int) -> State:
        if i >= self.total - self.running:
            return State.RUNNING
        bucket = i % 100
        return (
            State.SUCCEEDED
            if bucket < 80
            else State.FAILED_CRASH
            if bucket < 95
            else State.FAILED_ABANDONED
            if bucket < 98
            else State.FAILED_TIMEOUT
        )

    def created(self, i: int) -> float:
        if i >= self.total - self.running:
            return self.now - 3600 + (i - self.total + self.running) * 0.01
        return self.now - 30 * 86400 + i * (29 * 86400 / self.total)


def add_run(store: Store, lay: Layout, i: int, run_id: str, pid: tuple[int, int]) -> None:
    """One run as the daemon would have made it: created, started and (unless running)
    ended, with its transitions and events, and its failure or its attached process."""
    state, created = lay.state(i), lay.created(i)
    started = created + 1.0
    ended = None if state == State.RUNNING else started + i % 600
    store.runs.create(
        NewRun(
            run_id=run_id,
            experiment=f"exp-{i % 100}",
            variation=f"v{(i // 100) % 100}",
            params_json=f'{{"lr": 0.01, "seed": {i}}}',
            tags_json="{}",
            created_at=created,
            cwd="/tmp",
            run_dir=str(lay.data / "runnerd" / "runs" / run_id),
            host="bench",
        ),
        "bench",
    )
    beats = RunUpdate(
        started_at=started,
        heartbeat_seq=5,
        heartbeats=5,
        last_heartbeat_at=ended or lay.now - i % 300,
        heartbeat_timeout=900.0,
        lost_grace=172800.0,
    )
    store.runs.set_state(
        store.runs.require(run_id),
        State.RUNNING,
        at=started,
        cause="start",
        source="bench",
        change=beats,
    )
    if ended is None:
        store.attachments.add_pid(run_id, *pid, lay.now - 3600)
        return
    store.runs.set_state(
        store.runs.require(run_id),
        state,
        at=ended,
        cause="bench",
        source="bench",
        change=RunUpdate(ended_at=ended),
    )
    if state in ENDS:
        failure_class, template = FAILURES[i % len(FAILURES)]
        store.failures.put(
            run_id, failure_record(failure_class, template.format(n=i % 977), ENDS[state], ended)
        )


def dead_pids(count: int) -> Iterator[tuple[int, int]]:
    """Pid numbers no process has right now, with a start time (so reuse is harmless)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    taken = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    free = [p for p in range(300, min(pid_max, 300 + count + len(taken))) if p not in taken]
    return ((pid, 4242) for pid in itertools.cycle(free))


def build_registry(db: Path, lay: Layout, live: tuple[int, int], chunk: int = 20_000) -> float:
    """Fill the daemon-made registry with `lay.total` runs; return the seconds it took."""
    began = time.monotonic()
    t0 = lay.now - 30 * 86400
    pids = itertools.chain(itertools.repeat(live, lay.live), dead_pids(lay.running))
    for first in range(0, lay.total, chunk):
        with registry(db) as store:
            for i in range(first, min(first + chunk, lay.total)):
                pid = next(pids) if lay.state(i) == State.RUNNING else (0, 0)
                add_run(store, lay, i, new_run_id(now=t0 + i * 0.002), pid)
    return time.monotonic() - began


@dataclass
class Restart:
    """Restart figures for one registry."""

    runs: int
    running: int
    build_seconds: float = 0.0
    db_mb: float = 0.0
    to_status: float = 0.0
    recovered_line: str = ""
    recover_seconds: float = float("nan")
    busy_after: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    second_start: float = 0.0
    second_recover: float = float("nan")


def recovered(log: str) -> tuple[str, float]:
    """The last 'recovered N active runs ... in X s' log line and its X."""
    found = list(RECOVERED.finditer(log))
    if not found:
        return "(no 'recovered' line in the log)", float("nan")
    return found[-1].group(0), float(found[-1].group(3))


def stage_restart(root: Path, plan: Plan, quiet: Quiet) -> Restart:
    """Build a registry of `plan.registry_runs` runs and time a daemon start on it, twice."""
    daemon = Runnerd(root, log_level="info")
    res = Restart(plan.registry_runs, plan.registry_running)
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        daemon.start(60.0)  # the daemon makes the schema
        daemon.stop()
        print(f"building a registry of {plan.registry_runs} runs", file=sys.stderr, flush=True)
        lay = Layout(
            plan.registry_runs, plan.registry_running, plan.live_running, time.time(), root / "data"
        )
        start = procinfo.start_time(sleeper.pid)
        assert start is not None, "the sleeper is gone"
        res.build_seconds = build_registry(daemon.db, lay, (sleeper.pid, start))
        res.db_mb = daemon.db.stat().st_size / 1e6
        quiet.wait()
        print("restarting on it", file=sys.stderr, flush=True)
        res.to_status = daemon.timed_start()
        res.recovered_line, res.recover_seconds = recovered(daemon.log.read_text())
        res.busy_after = daemon.wait_idle(600.0)
        res.counts = daemon.counts()
        daemon.stop()
        quiet.wait()
        res.second_start = daemon.timed_start()
        _, res.second_recover = recovered(daemon.log.read_text())
    finally:
        daemon.stop()
        sleeper.kill()
        sleeper.wait()
    return res


# --- output -----------------------------------------------------------------------


def print_kills(kills: list[Kill]) -> None:
    print(f"\nDeath detection: {len(kills)} SIGKILLed clients, one at a time")
    print(f"{'from the SIGKILL to':<52} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    print(
        pct_row("the daemon noticing (failure 'at', ms resolution)", [k.noticed for k in kills], 52)
    )
    print(pct_row("`get` showing failed_crash (polled every 1 ms)", [k.seen for k in kills], 52))
    classes = sorted({k.failure_class for k in kills})
    p99 = pct([k.seen for k in kills], 0.99)
    print(
        f"failure_class: {', '.join(classes)}; target (SPEC §2): failed_crash within 1 s: "
        f"p99 {p99 * 1e3:.0f} ms {verdict(p99 < 1.0)}"
    )


def print_hold(hold: Hold, plan: Plan) -> None:
    tick = 100 / CLK_TCK / plan.idle_seconds
    print(
        f"\nIdle daemon over {plan.idle_seconds:g} s (CPU % = utime+stime / wall, resolution "
        f"{tick:.2f}%; schedstat: the same in ns; wakeups: context switches/s, all threads)"
    )
    print(
        f"{'running runs held':>17} {'CPU %':>6} {'schedstat %':>11} {'wakeups/s':>9} {'RSS MB':>7}"
    )
    for idle in (hold.empty, hold.full):
        if idle is not None:
            print(
                f"{idle.runs:>17} {idle.cpu_pct:>6.2f} {idle.precise_pct:>11.3f} "
                f"{idle.wakeups:>9.1f} {idle.rss_mb:>7.1f}"
            )
    rate = plan.held_runs / hold.fill_seconds if hold.fill_seconds else float("nan")
    print(
        f"filled {plan.held_runs} create+start (heartbeat_timeout 3600 s) from "
        f"{plan.fill_procs} processes in {hold.fill_seconds:.1f} s ({rate:.0f}/s, "
        f"{hold.fill_errors} errors); daemon busy {hold.backlog_seconds:.1f} s more "
        "(metadata.json, first samples)"
    )
    print(
        f"then all {plan.fill_procs} holders exited at once: every run failed_crash after "
        f"{hold.mass_death_seconds:.1f} s"
    )
    if hold.full is not None:
        print(
            f"target: idle CPU < 1% with {hold.full.runs} runs: {hold.full.precise_pct:.3f}% "
            f"{verdict(hold.full.precise_pct < 1.0)}"
        )


def print_restart(res: Restart) -> None:
    print(
        f"\nRestart on a registry of {res.runs} runs, {res.running} of them running "
        f"(all but 10 attached to dead pids)"
    )
    print(f"built through the registry's Store in {res.build_seconds:.1f} s: {res.db_mb:.0f} MB")
    print(f"{'start':<44} {'to status s':>11} {'recover s':>9}")
    print(
        f"{'first (reconciles the dead runs)':<44} {res.to_status:>11.2f} "
        f"{res.recover_seconds:>9.3f}"
    )
    print(
        f"{'second (nothing left to reconcile)':<44} {res.second_start:>11.2f} "
        f"{res.second_recover:>9.3f}"
    )
    print(f"log: {res.recovered_line}")
    print(
        f"daemon busy {res.busy_after:.1f} s after the first status answer (metadata.json, "
        "crash-file scans)"
    )
    print("counts after: " + ", ".join(f"{n} {s}" for s, n in sorted(res.counts.items())))
    print(
        f"target: reconcile {res.runs} runs < 10 s: {res.to_status:.1f} s "
        f"{verdict(res.to_status < 10)}"
    )


def print_hangs(hangs: Hangs, plan: Plan) -> None:
    timeouts = ", ".join(f"{k} {v:g} s" for k, v in HANG_CONFIG.items())
    print(f"\nHung commands under runnerctl exec, {plan.hangs} of each at once ({timeouts})")
    for problem in hangs.problems:
        print(f"  could not measure: {problem}")
    print(f"{'from ... to lost':<52} {'p50 s':>7} {'max s':>7} {'bound s':>7}")
    bound_stop = HANG_CONFIG["heartbeat_timeout"] * 1.25
    bound_stall = HANG_CONFIG["stall_timeout"] + HANG_CONFIG["sample_interval"]
    for label, values, bound in (
        ("SIGSTOP -> lost (stopped)", hangs.stopped, bound_stop),
        ("last output -> lost (stalled)", hangs.stalled, bound_stall),
    ):
        if values:
            print(f"{label:<52} {pct(values, 0.5):>7.1f} {max(values):>7.1f} {bound:>7.1f}")
    worst = (
        max([*hangs.stopped, 0.0]) <= bound_stop
        and max([*hangs.stalled, 0.0]) <= bound_stall
        and not hangs.problems
    )
    print(
        "target: stopped within heartbeat_timeout (+ a beat interval, a quarter of it), "
        f"stalled within stall_timeout + one sample_interval: {verdict(worst)}"
    )


def main() -> None:
    parser = arguments(__doc__, "20 kills, 10,000 held runs, a 100,000-run registry (< 60 s)")
    parser.add_argument("--kills", type=int, help="override the number of SIGKILLs")
    args = parser.parse_args()
    bench = session(args)
    plan = QUICK if args.quick else FULL
    if args.kills:
        plan = replace(plan, kills=args.kills)
    with temp_root() as root:
        daemon = Runnerd(root / "a")
        os.environ.update(daemon.env)  # forked clients put spools and run folders under root
        try:
            bench.quiet.wait()
            daemon.start(60.0)
            kills = stage_kills(daemon, plan)
            hold = stage_hold(daemon, plan, bench.quiet)
        finally:
            daemon.stop()
        hangs = stage_hangs(root / "h", plan, bench.quiet)
        restart = stage_restart(root / "b", plan, bench.quiet)
    bench.stop()
    bench.header("liveness", "quick" if args.quick else "full")
    print_kills(kills)
    print_hold(hold, plan)
    print_hangs(hangs, plan)
    print_restart(restart)


if __name__ == "__main__":
    main()
