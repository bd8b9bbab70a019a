"""Sweep figures for runnerd: what `runnerctl sweep run` adds per cell, and planning a resume.

Starts a fresh daemon in a temp folder, times `runnerctl sweep run --jobs 2` over N cells of
`true` beside `xargs -P 2` running the same N `true` commands, then makes a 100,000-cell
sweep (SweepCreate over the protocol; half its cells marked succeeded and a quarter failed
through the registry's Store while the daemon is stopped) and times, on the restarted
daemon, what `sweep resume` does before its first cell. Prints tables and cleans up.
Not a test: it asserts nothing, it reports.

    python bench/bench_sweeps.py [--quick] [--cells N] [--big N]
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness import (
    RUNNERCTL,
    Quiet,
    Runnerd,
    Session,
    arguments,
    registry,
    session,
    temp_root,
    time_command,
    time_floor,
    verdict,
)

from runnerd.cli.sweep_driver import with_latest
from runnerd.registry import NewRun, RunUpdate
from runnerd.states import failure_record
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    Create,
    Heartbeat,
    Start,
    State,
    Succeed,
    SweepCreate,
    SweepEnd,
    SweepGet,
    SweepStart,
)
from runnerd_client.sweep import sweep_cells as cells

EXPERIMENT = "bench"
IDLE, TAKE_OVER = "without SweepStart", "as `sweep resume`"
MAX_GRID_ARG = 100_000  # bytes: longer --grid values go to a --grid-file (MAX_ARG_STRLEN 128 KiB)


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    cells: int  # cells of `sweep run`
    big: int  # cells of the sweep whose resume is planned
    repeat: int = 1  # `sweep run`s (and xargs runs), best kept
    reps: int = 5  # timed resume plans
    show_reps: int = 3  # timed `sweep show --json`


FULL = Plan(cells=1_000, big=100_000)
QUICK = Plan(cells=200, big=20_000, reps=3, show_reps=2)


def child_cpu() -> float:
    """CPU-seconds of every reaped child of this process (and of their reaped children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- stage 1: `sweep run` against xargs -----------------------------------------------


@dataclass
class SweepRun:
    """Best wall times of `runnerctl sweep run` and of xargs, with the CPU they took."""

    cells: int
    xargs: float = float("inf")
    xargs_cpu: float = 0.0
    wall: float = float("inf")
    ctl_cpu: float = 0.0  # runnerctl with its cells
    daemon_cpu: float = 0.0  # while runnerctl ran
    drain: float = 0.0  # seconds the daemon stayed busy after runnerctl exited
    drain_cpu: float = 0.0
    exit_code: int = 0
    last_line: str = ""


def grid_args(count: int, root: Path) -> list[str]:
    """`--grid i=0,1,...`, or a --grid-file when that argument would be too long."""
    grid = f"i={','.join(map(str, range(count)))}"
    if len(grid) <= MAX_GRID_ARG:
        return ["--grid", grid]
    path = root / "grid.json"
    path.write_text(f'{{"i": [{grid[2:]}]}}')
    return ["--grid-file", str(path)]


def time_xargs(count: int) -> tuple[float, float]:
    """Wall and CPU seconds of `seq COUNT | xargs -P 2 -I{} true`."""
    cpu0, began = child_cpu(), time.perf_counter()
    subprocess.run(["sh", "-c", f"seq {count} | xargs -P 2 -I{{}} true"], check=True)
    return time.perf_counter() - began, child_cpu() - cpu0


def stage_sweep_run(plan: Plan, runnerd: Runnerd, root: Path, quiet: Quiet) -> SweepRun:
    """`sweep run --jobs 2` of `true` over plan.cells cells, and xargs, each plan.repeat times."""
    res = SweepRun(plan.cells)
    argv = [
        *RUNNERCTL,
        "sweep",
        "run",
        "--experiment",
        EXPERIMENT,
        *grid_args(plan.cells, root),
        "--jobs",
        "2",
        "--failure-policy",
        "continue_on_failure",
        "--",
        "true",
    ]
    for n in range(plan.repeat):
        quiet.wait()
        wall, cpu = time_xargs(plan.cells)
        if wall < res.xargs:
            res.xargs, res.xargs_cpu = wall, cpu
        print(
            f"sweep run of {plan.cells} cells ({n + 1}/{plan.repeat})", file=sys.stderr, flush=True
        )
        daemon0, cpu0, began = runnerd.cpu(), child_cpu(), time.perf_counter()
        proc = subprocess.run(argv, env=runnerd.env, cwd=root, capture_output=True, text=True)
        wall = time.perf_counter() - began
        ctl_cpu, daemon1 = child_cpu() - cpu0, runnerd.cpu()
        drain = runnerd.wait_idle()
        if wall < res.wall:
            res.wall, res.ctl_cpu, res.daemon_cpu = wall, ctl_cpu, daemon1 - daemon0
            res.drain, res.drain_cpu = drain, runnerd.cpu() - daemon1
            res.exit_code = proc.returncode
            res.last_line = (proc.stdout.strip().splitlines() or [proc.stderr.strip()])[-1]
    return res


# --- stage 2: planning the resume of a large sweep ----------------------------------


@dataclass
class Resume:
    """The large sweep, how it was made, and the timed steps of planning its resume."""

    cells: int
    sweep_id: str = ""
    create: float = 0.0  # SweepCreate round trip
    end: float = 0.0  # SweepEnd round trip (it waits for manifest.json)
    build: float = 0.0  # marking through the Store, daemon stopped
    restart: float = 0.0
    summary: dict[str, int] = field(default_factory=dict)
    planned: int = 0
    steps: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # variant, step
    stall: tuple[float, float] = (0.0, 0.0)  # worst heartbeat ms: idle, manifest rewrite
    commands: list[tuple[str, list[float]]] = field(default_factory=list)


def create_sweep(sock: Path, count: int, res: Resume) -> None:
    """A sweep of `count` cells of `true` (rounded up to a hundred: a grid of i x j, j < 100,
    since a request holds at most 10,000 list items), made and ended (failed) over the
    protocol."""
    res.sweep_id = new_run_id()
    spec = {
        "kind": "command",
        "command": ["true"],
        "cwd": "/tmp",
        "grid": {"i": list(range(-(-count // 100))), "j": list(range(100))},
    }
    conn = Connection(sock, client="bench_sweeps")
    try:
        began = time.perf_counter()
        conn.call(
            SweepCreate(
                key=new_key(),
                sweep_id=res.sweep_id,
                experiment="bench-big",
                spec=spec,
                failure_policy="continue_on_failure",
            ),
            timeout=600,
        )
        res.create = time.perf_counter() - began
        conn.call(SweepEnd(key=new_key(), sweep_id=res.sweep_id, status="failed"), timeout=600)
        res.end = time.perf_counter() - began - res.create
    finally:
        conn.close()


def cell_state(idx: int) -> State | None:
    """Even cells succeeded, cells 1 mod 4 failed, cells 3 mod 4 never attempted."""
    return State.SUCCEEDED if idx % 2 == 0 else State.FAILED_CRASH if idx % 4 == 1 else None


def mark_cells(db: Path, sweep_id: str) -> float:
    """With the daemon stopped: a run (and failure) for each attempted cell, made from the
    cell's own params and variation, and claimed by it; through the registry's Store."""
    began, now = time.monotonic(), time.time()
    with registry(db) as store:
        for cell in store.sweeps.cells(sweep_id):
            state = cell_state(cell.index)
            if state is None:
                continue
            at = now - 3600 + cell.index * 0.01
            run_id = new_run_id(now=at)
            store.runs.create(
                NewRun(
                    run_id=run_id,
                    experiment="bench-big",
                    variation=cell.variation,
                    params_json=json.dumps(cell.params),
                    tags_json="{}",
                    created_at=at,
                    cwd="/tmp",
                    host="bench",
                    sweep_id=sweep_id,
                    cell=cell.index,
                ),
                "bench",
            )
            store.runs.set_state(
                store.runs.require(run_id),
                State.RUNNING,
                at=at,
                cause="start",
                source="bench",
                change=RunUpdate(started_at=at, last_heartbeat_at=at),
            )
            store.runs.set_state(
                store.runs.require(run_id),
                state,
                at=at + 0.005,
                cause="bench",
                source="bench",
                change=RunUpdate(ended_at=at + 0.005),
            )
            if state == State.FAILED_CRASH:
                store.failures.put(
                    run_id,
                    failure_record("ExitCode", "exit code 1", "crash", at + 0.005, exit_code=1),
                )
            store.sweeps.claim_cell(sweep_id, cell.index, run_id)
    return time.monotonic() - began


def plan_resume(sock: Path, sweep_id: str, take_over: bool) -> tuple[dict[str, float], int]:
    """What `runnerctl sweep resume` does before its first cell, step by step (seconds).

    With `take_over`, SweepStart as resume sends it (which makes the daemon rewrite
    manifest.json), and the turn is ended again, untimed, so every run finds the same sweep.
    """
    steps: dict[str, float] = {}
    began = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[name], last = now - last, now

    conn = Connection(sock, client="bench_sweeps")
    try:
        lap("connect")
        stored = conn.call(SweepGet(sweep=sweep_id))["sweep"]
        lap("SweepGet (with cells_summary)")
        if take_over:
            conn.call(SweepStart(key=new_key(), sweep_id=stored["sweep_id"]))
            lap("SweepStart")
        unfinished = list(cells(conn, stored["sweep_id"], unfinished=True))
        lap("SweepCells pages (unfinished)")
        planned = [with_latest(c) for c in unfinished]
        lap("with_latest")
        steps["pages + with_latest"] = steps["SweepCells pages (unfinished)"] + steps["with_latest"]
        steps["total"] = last - began
        if take_over:
            conn.call(SweepEnd(key=new_key(), sweep_id=sweep_id, status="failed"), timeout=600)
    finally:
        conn.close()
    return steps, len(planned)


def heartbeat_stall(sock: Path, sweep_id: str, seconds: float = 2.0) -> tuple[float, float]:
    """Worst heartbeat round trip (ms) of a run, beating every 5 ms for `seconds` on an idle
    daemon, then for as long after a SweepStart (the daemon rewrites manifest.json)."""
    conn = Connection(sock, client="bench_sweeps")
    worst = []
    try:
        run_id = new_run_id()
        conn.call(
            Create(key=new_key(), run_id=run_id, experiment="bench-stall", variation="default")
        )
        conn.call(Start(key=new_key(), run_id=run_id))
        seq = 0
        for take_over in (False, True):
            if take_over:
                conn.call(SweepStart(key=new_key(), sweep_id=sweep_id))
            began, longest = time.perf_counter(), 0.0
            while time.perf_counter() - began < seconds:
                seq += 1
                sent = time.perf_counter()
                conn.call(Heartbeat(run_id=run_id, seq=seq))
                longest = max(longest, time.perf_counter() - sent)
                time.sleep(0.005)
            worst.append(longest * 1e3)
        conn.call(Succeed(key=new_key(), run_id=run_id))
        conn.call(SweepEnd(key=new_key(), sweep_id=sweep_id, status="failed"), timeout=600)
    finally:
        conn.close()
    return worst[0], worst[1]


def stage_resume(plan: Plan, runnerd: Runnerd, quiet: Quiet) -> Resume:
    """Make the large sweep, mark half of it done, restart, time the resume plan and `show`."""
    res = Resume(plan.big)
    print(f"creating a sweep of {plan.big} cells", file=sys.stderr, flush=True)
    create_sweep(runnerd.socket, plan.big, res)
    runnerd.wait_idle()
    runnerd.stop()
    res.build = mark_cells(runnerd.db, res.sweep_id)
    began = time.perf_counter()
    runnerd.start()
    res.restart = time.perf_counter() - began
    runnerd.wait_idle()
    for take_over in (False, True):
        variant = res.steps.setdefault(TAKE_OVER if take_over else IDLE, {})
        for n in range(plan.reps):
            quiet.wait()
            print(
                f"resume plan {n + 1}/{plan.reps}" + (" with SweepStart" if take_over else ""),
                file=sys.stderr,
                flush=True,
            )
            steps, res.planned = plan_resume(runnerd.socket, res.sweep_id, take_over)
            for name, seconds in steps.items():
                variant.setdefault(name, []).append(seconds)
            runnerd.wait_idle()
    quiet.wait()
    print("heartbeats during a manifest rewrite", file=sys.stderr, flush=True)
    res.stall = heartbeat_stall(runnerd.socket, res.sweep_id)
    runnerd.wait_idle()
    with runnerd.connect() as conn:
        res.summary = conn.call(SweepGet(sweep=res.sweep_id))["sweep"]["cells_summary"]
    quiet.wait()
    print("runnerctl sweep show --json", file=sys.stderr, flush=True)
    res.commands = [
        (
            "runnerctl sweep show --json",
            time_command(
                [*RUNNERCTL, "sweep", "show", "--json", res.sweep_id], runnerd.env, plan.show_reps
            ),
        ),
        time_floor(plan.show_reps),
    ]
    return res


# --- output -------------------------------------------------------------------------


def print_sweep_run(res: SweepRun, repeat: int) -> None:
    per = 1e3 / res.cells
    overhead = (res.wall - res.xargs) * per
    print(
        f"\n`runnerctl sweep run --jobs 2 --failure-policy continue_on_failure -- true` over "
        f"{res.cells} cells, beside `seq {res.cells} | xargs -P 2 -I{{}} true`"
        + (f" (best of {repeat})" if repeat > 1 else "")
    )
    print(f"{'':<28} {'wall s':>7} {'ms/cell':>8} {'CPU s':>7} {'CPU ms/cell':>11}")
    print(
        f"{'xargs -P 2':<28} {res.xargs:>7.2f} {res.xargs * per:>8.2f} {res.xargs_cpu:>7.2f} "
        f"{res.xargs_cpu * per:>11.2f}"
    )
    print(
        f"{'runnerctl sweep run':<28} {res.wall:>7.2f} {res.wall * per:>8.2f} "
        f"{res.ctl_cpu:>7.2f} {res.ctl_cpu * per:>11.2f}"
    )
    print(
        f"{'  runnerd, meanwhile':<28} {'':>7} {'':>8} {res.daemon_cpu:>7.2f} "
        f"{res.daemon_cpu * per:>11.2f}"
    )
    print(
        f"{'  runnerd, after exit':<28} {res.drain:>7.2f} {'':>8} {res.drain_cpu:>7.2f} "
        f"{res.drain_cpu * per:>11.2f}"
    )
    print(f"runnerctl exit {res.exit_code}: {res.last_line}")
    print(
        f"ratio {res.wall / res.xargs:.1f}x; target: overhead < 5 ms/cell: "
        f"{overhead:.2f} ms {verdict(overhead < 5)}"
    )
    print(
        "(CPU of runnerctl and xargs includes their `true`s; runnerd after exit: how long "
        "it stayed busy, writing metadata.json and manifest.json)"
    )


def _ms(values: Sequence[float] | None) -> str:
    if not values:
        return f"{'-':>9} {'-':>7}"
    return f"{statistics.median(values) * 1e3:>9.1f} {max(values) * 1e3:>7.1f}"


def print_resume(res: Resume) -> None:
    print(
        f"\nResume plan of a {res.cells}-cell sweep: "
        + ", ".join(f"{n} {s}" for s, n in res.summary.items() if n and s != "total")
        + f"; {res.planned} cells planned"
    )
    print(
        f"made by SweepCreate in {res.create:.2f} s (its SweepEnd, which waits for "
        f"manifest.json: {res.end:.2f} s); cells marked through the registry's Store in "
        f"{res.build:.1f} s; daemon restarted in {res.restart:.2f} s"
    )
    idle, taken = res.steps[IDLE], res.steps[TAKE_OVER]
    print(f"{'':<40} {IDLE:>17} {TAKE_OVER:>17}")
    print(
        f"{'step (one Connection)':<40} {'median ms':>9} {'max ms':>7} {'median ms':>9} "
        f"{'max ms':>7}"
    )
    for name in taken:
        print(f"{name:<40} {_ms(idle.get(name))} {_ms(taken[name])}")
    for label, values in res.commands:
        print(f"{label:<40} {_ms(values)}")
    for variant, steps in res.steps.items():
        median = statistics.median(steps["pages + with_latest"])
        print(
            f"target: pages + with_latest < 1 s, {variant}: median {median * 1e3:.0f} ms "
            f"{verdict(median < 1)}"
        )
    print(
        f"worst heartbeat round trip: {res.stall[0]:.1f} ms on the idle daemon, "
        f"{res.stall[1]:.1f} ms while it rewrites this sweep's manifest.json (after SweepStart)"
    )
    print(
        f"({len(res.steps[IDLE]['total'])} plans each; the first without SweepStart is the "
        "first after the restart; SweepCells pages of 5,000; SweepStart makes the daemon "
        "rewrite manifest.json 0.2 s later, on the registry thread the pages need)"
    )


# --- main ---------------------------------------------------------------------------


@dataclass
class Report:
    sweep_run: SweepRun | None = None
    resume: Resume | None = None


def run(plan: Plan, bench: Session) -> Report:
    """Both stages on one fresh daemon, stopped and removed whatever happens."""
    report = Report()
    with temp_root() as root:
        runnerd = Runnerd(root / "rd")
        try:
            runnerd.start(20.0)
            if plan.cells:
                report.sweep_run = stage_sweep_run(plan, runnerd, root, bench.quiet)
            if plan.big:
                report.resume = stage_resume(plan, runnerd, bench.quiet)
        finally:
            runnerd.stop()
    bench.stop()
    return report


def main() -> None:
    parser = arguments(__doc__, "200 cells for `sweep run`, a 20,000-cell sweep to resume")
    parser.add_argument("--cells", type=int, metavar="N", help="cells of `sweep run` (0: skip)")
    parser.add_argument(
        "--big", type=int, metavar="N", help="cells of the sweep to resume (0: skip)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run `sweep run` and xargs N times and keep the best (default 1)",
    )
    args = parser.parse_args()
    bench = session(args)
    plan = replace(QUICK if args.quick else FULL, repeat=max(1, args.repeat))
    if args.cells is not None:
        plan = replace(plan, cells=args.cells)
    if args.big is not None:
        plan = replace(plan, big=args.big)
    report = run(plan, bench)
    mode = "quick" if args.quick else "full"
    if args.cells is not None or args.big is not None:
        mode = f"{plan.cells}/{plan.big}-cell"
    bench.header("sweeps", mode)
    if report.sweep_run is not None:
        print_sweep_run(report.sweep_run, plan.repeat)
    if report.resume is not None:
        print_resume(report.resume)


if __name__ == "__main__":
    main()
