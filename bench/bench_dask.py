"""Dask figures for runnerd: what RunnerdWorkerPlugin costs a cluster, and how fast a killed
worker's run fails.

Starts a fresh daemon in a temp folder and 2-worker LocalClusters
(processes, 1 thread each) whose workers inherit its socket: times `client.map(inc, range N)`
plus gather on a cluster with the plugin, one without, and one whose plugin talks to
the bare msgpack server, alternately, with how long the daemon then took to record every run
and the CPU each party used; then SIGKILLs workers running a task, one at a time, and polls
`get` until their run is failed_crash. Prints tables and cleans up. Not a test: it reports.

    python bench/bench_dask.py [--quick] [--tasks N] [--rounds N] [--kills N]
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster
from harness import (
    Bare,
    Kill,
    Quiet,
    Runnerd,
    Session,
    arguments,
    cpu_seconds,
    kill_and_watch,
    pct,
    pct_row,
    session,
    temp_root,
    verdict,
)

from runnerd_client.connection import Connection
from runnerd_client.dask import PLUGIN_NAME, RunnerdWorkerPlugin
from runnerd_client.protocol import ListRuns, Status

EXPERIMENT, KILL_EXPERIMENT = "bench-dask", "bench-dask-kill"
INHERITED = ("RUNNERD_SOCKET", "RUNNERD_DB", "XDG_DATA_HOME", "XDG_STATE_HOME")
WITH, WITHOUT, BARE = "with plugin", "without", "plugin, bare"


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    tasks: int  # tasks per timed map (0: skip)
    rounds: int  # timed maps per configuration
    kills: int  # SIGKILLed workers (0: skip)
    warmup: int = 200  # tasks of the untimed map on a new cluster
    poll: float = 0.02  # seconds between Status polls while runs are recorded
    bare: bool = True  # also time the plugin against the bare server (its own cost)


FULL = Plan(tasks=5_000, rounds=5, kills=20)
QUICK = Plan(tasks=1_000, rounds=3, kills=5)


# --- tasks (pickled by value: this module is __mp_main__ on the workers) ------------


def inc(x: int) -> int:
    return x + 1


def hold(stop: str, limit: float = 120.0) -> str:
    """Sleep until the file `stop` exists, so a rerun after the kill ends when we say."""
    deadline = time.monotonic() + limit
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(0.01)
    return stop


def has_plugin(dask_worker: Any) -> bool:
    return PLUGIN_NAME in dask_worker.plugins


# --- clusters -----------------------------------------------------------------------


@contextlib.contextmanager
def cluster(experiment: str | None, warmup: int, socket_path: str | None = None) -> Iterator[Any]:
    """A 2-worker LocalCluster and its Client, with the worker plugin if `experiment`; warm."""
    options: dict[str, Any] = {
        "n_workers": 2,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "silence_logs": logging.ERROR,
        "scheduler_kwargs": {"dashboard_address": ":0"},  # no dashboard, nor a port collision
    }
    with LocalCluster(**options) as made, Client(made) as client:  # type: ignore[no-untyped-call]
        if experiment is not None:
            client.register_plugin(
                RunnerdWorkerPlugin(experiment=experiment, socket_path=socket_path)
            )
        client.gather(client.map(inc, range(warmup), pure=False))
        found = set(client.run(has_plugin).values())
        if found != {experiment is not None}:
            raise RuntimeError(f"plugin on the workers: {found}, expected {experiment}")
        yield client


def worker_cpu(client: Any) -> float:
    """CPU-seconds of the cluster's worker processes so far."""
    return sum(cpu_seconds(pid) for pid in client.run(os.getpid).values())


def succeeded(conn: Connection) -> int:
    return int(conn.call(Status(limit=1))["counts"].get("succeeded", 0))


# --- stage 1: the plugin's cost on trivial tasks ------------------------------------


@dataclass
class Round:
    """One timed map+gather, and what the server (runnerd, or bare) did because of it."""

    config: str
    wall: float
    recorded: float  # s after the gather until runnerd's `succeeded` grew by the task count
    runs: int  # how much `succeeded` grew (0 without the plugin or against the bare server)
    busy: float  # s the server stayed busy after that (runnerd: metadata.json)
    server_cpu: float  # from the map to the server idle again
    server_cpu_map: float  # during the map+gather only
    workers_cpu: float
    local_cpu: float  # this process: scheduler, client (and the Status polls)


def timed_round(client: Any, config: str, plan: Plan, server: Runnerd, conn: Connection) -> Round:
    """map+gather `plan.tasks` fresh keys, then wait for runnerd to record them and rest."""
    before = succeeded(conn)
    sv0, wk0, own0 = server.cpu(), worker_cpu(client), time.process_time()
    began = time.perf_counter()
    client.gather(client.map(inc, range(plan.tasks), pure=False))
    wall = time.perf_counter() - began
    sv_map, wk, own = server.cpu() - sv0, worker_cpu(client) - wk0, time.process_time() - own0
    runs, deadline = succeeded(conn) - before, time.perf_counter() + 120
    while config == WITH and runs < plan.tasks and time.perf_counter() < deadline:
        time.sleep(plan.poll)
        runs = succeeded(conn) - before
    recorded = time.perf_counter() - began - wall if config == WITH else float("nan")
    busy = server.wait_idle(probe=0.25)
    runs = succeeded(conn) - before
    return Round(config, wall, recorded, runs, busy, server.cpu() - sv0, sv_map, wk, own)


def stage_overhead(plan: Plan, runnerd: Runnerd, bare: Bare, quiet: Quiet) -> list[Round]:
    """The clusters live side by side; their maps alternate (ABC, CBA, ...)."""
    rounds: list[Round] = []
    servers = {WITH: runnerd, WITHOUT: runnerd, BARE: bare}
    with contextlib.ExitStack() as stack:
        conn = Connection(runnerd.socket, client="bench_dask")
        stack.callback(conn.close)
        print("starting the clusters", file=sys.stderr, flush=True)
        clients = {
            WITH: stack.enter_context(cluster(EXPERIMENT, plan.warmup)),
            WITHOUT: stack.enter_context(cluster(None, plan.warmup)),
            **(
                {BARE: stack.enter_context(cluster(EXPERIMENT, plan.warmup, str(bare.socket)))}
                if plan.bare
                else {}
            ),
        }
        quiet.ours = lambda: (
            time.process_time()
            + runnerd.cpu()
            + (bare.cpu() if plan.bare else 0.0)
            + sum(worker_cpu(c) for c in clients.values())
        )
        runnerd.wait_idle(probe=0.25)
        for n in range(plan.rounds):
            for config in list(clients)[:: 1 if n % 2 == 0 else -1]:
                quiet.wait()
                print(
                    f"map of {plan.tasks} tasks {config} ({n + 1}/{plan.rounds})",
                    file=sys.stderr,
                    flush=True,
                )
                rounds.append(timed_round(clients[config], config, plan, servers[config], conn))
    return rounds


# --- stage 2: a SIGKILLed worker's run ----------------------------------------------


@dataclass
class Kills:
    """The SIGKILLs, and how long the steps around each took (seconds)."""

    kills: list[Kill] = field(default_factory=list)
    to_running: list[float] = field(default_factory=list)  # submit -> run `running` in daemon
    restart: list[float] = field(default_factory=list)  # kill -> 2 workers with the plugin


def running_run(conn: Connection, key: str, timeout: float = 60.0) -> dict[str, Any]:
    """The daemon's running run of Dask key `key`, polled every 2 ms."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        for run in conn.call(ListRuns(experiment=KILL_EXPERIMENT, state="running", limit=10))[
            "runs"
        ]:
            if run["tags"].get("dask_key") == key:
                return dict(run)
        time.sleep(0.002)
    raise RuntimeError(f"no running run of {key} after {timeout} s")


def back_to_two(client: Any, timeout: float = 60.0) -> None:
    """Wait until the nanny's new worker is up with the plugin beside the survivor."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            found = client.run(has_plugin)
            if len(found) == 2 and all(found.values()):
                return
        time.sleep(0.02)
    raise RuntimeError(f"the cluster did not get 2 workers with the plugin in {timeout} s")


def stage_kills(plan: Plan, runnerd: Runnerd, root: Path, quiet: Quiet) -> Kills:
    """One task at a time: wait for its run to be running, SIGKILL its worker, poll `get`."""
    res = Kills()
    conn = Connection(runnerd.socket, client="bench_dask")
    try:
        print("starting the cluster for the kills", file=sys.stderr, flush=True)
        with cluster(KILL_EXPERIMENT, 20) as client:
            quiet.ours = lambda: time.process_time() + runnerd.cpu() + worker_cpu(client)
            for n in range(plan.kills):
                quiet.wait()
                print(f"kill {n + 1}/{plan.kills}", file=sys.stderr, flush=True)
                stop, key = root / f"stop-{n}", f"hold-{n}"
                began = time.perf_counter()
                future = client.submit(hold, str(stop), key=key)
                run = running_run(conn, key)
                res.to_running.append(time.perf_counter() - began)
                pid = client.run(os.getpid)[run["tags"]["worker"]]
                began = time.perf_counter()
                res.kills.append(kill_and_watch(conn, pid, run["run_id"]))
                stop.touch()  # Dask's rerun on the other worker returns
                future.result(timeout=120)
                future.release()
                back_to_two(client)
                res.restart.append(time.perf_counter() - began)
    finally:
        conn.close()
    return res


# --- output -------------------------------------------------------------------------


def print_overhead(rounds: list[Round], plan: Plan) -> None:
    configs = [c for c in (WITH, WITHOUT, BARE) if any(r.config == c for r in rounds)]
    by = {c: [r for r in rounds if r.config == c] for c in configs}

    def med(config: str, value: Callable[[Round], float]) -> float:
        return statistics.median(value(r) for r in by[config])

    print(
        f"\n`client.gather(client.map(inc, range({plan.tasks}), pure=False))` on 2-worker "
        f"LocalClusters (processes, 1 thread each), {plan.rounds} rounds each, alternating"
    )
    print(
        f"{'':<12} {'median s':>8} {'min s':>6} {'max s':>6} {'tasks/s':>7} "
        f"{'recorded ms':>11} {'runs':>5} {'busy s':>6} {'server CPU s':>12} "
        f"{'ms/task':>7} {'workers CPU s':>13} {'local CPU s':>11}"
    )
    for config in configs:
        walls = [r.wall for r in by[config]]
        median, server = med(config, lambda r: r.wall), med(config, lambda r: r.server_cpu)
        recorded, busy = med(config, lambda r: r.recorded), med(config, lambda r: r.busy)
        workers, local = med(config, lambda r: r.workers_cpu), med(config, lambda r: r.local_cpu)
        during = f"{med(config, lambda r: r.server_cpu_map):.2f} / {server:.2f}"
        print(
            f"{config:<12} {median:>8.2f} {min(walls):>6.2f} {max(walls):>6.2f} "
            f"{plan.tasks / median:>7.0f} {recorded * 1e3:>11.0f} "
            f"{min(r.runs for r in by[config]):>5} {busy:>6.1f} {during:>12} "
            f"{server / plan.tasks * 1e3:>7.2f} {workers:>13.2f} {local:>11.2f}"
        )
    for config in configs:
        print(f"  {config} walls: " + " ".join(f"{r.wall:.2f}" for r in by[config]))
    ratio = med(WITH, lambda r: r.wall) / med(WITHOUT, lambda r: r.wall)
    print(f"ratio with/without {ratio:.2f}; target: < 1.2 {verdict(ratio < 1.2)}")
    if BARE in by:
        bare = med(BARE, lambda r: r.wall) / med(WITHOUT, lambda r: r.wall)
        print(
            f"ratio plugin on the bare server/without {bare:.2f} (the plugin's own cost, "
            "no runnerd work)"
        )
    extra = {
        name: (med(WITH, value) - med(WITHOUT, value)) / plan.tasks * 1e6
        for name, value in (
            ("workers", lambda r: r.workers_cpu),
            ("scheduler and client", lambda r: r.local_cpu),
            ("runnerd", lambda r: r.server_cpu),
        )
    }
    print(
        "the plugin's CPU per task: "
        + ", ".join(f"{k} +{v:.0f} us" for k, v in extra.items())
        + f", all on the same {os.cpu_count()} CPUs"
    )
    print(
        "(plugin, bare: the plugin talking to the bare msgpack server, which acks "
        "everything; recorded ms: after the gather, until runnerd counted every run "
        f"succeeded, polled every {plan.poll * 1e3:.0f} ms; runs: fewest recorded in a round; "
        "busy s: the server's CPU stayed above 5% that much longer; server CPU s: during the "
        "map / until idle; local: this process, which runs the schedulers; medians)"
    )


def print_kills(res: Kills) -> None:
    print(
        f"\nSIGKILLed workers: {len(res.kills)}, one at a time, each running `hold` "
        "(the nanny restarts it)"
    )
    print(f"{'from':<58} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for label, values in (
        ("SIGKILL to the daemon noticing (failure 'at')", [k.noticed for k in res.kills]),
        ("SIGKILL to `get` showing failed_crash (polled every 1 ms)", [k.seen for k in res.kills]),
        ("submit to the run `running` in the daemon", res.to_running),
        ("SIGKILL to 2 workers with the plugin again", res.restart),
    ):
        print(pct_row(label, values, 58))
    p99 = pct([k.seen for k in res.kills], 0.99)
    print(
        f"failure_class: {', '.join(sorted({k.failure_class for k in res.kills}))}; "
        f"target: failed_crash within 1 s: p99 {p99 * 1e3:.0f} ms {verdict(p99 < 1.0)}"
    )


# --- main ---------------------------------------------------------------------------


def run(plan: Plan, bench: Session) -> tuple[list[Round], Kills | None]:
    """Both stages on one fresh daemon, stopped and removed whatever happens."""
    rounds, kills = [], None
    with temp_root() as root:
        runnerd, bare = Runnerd(root / "rd"), Bare(root / "bare")
        for name in INHERITED:  # the worker processes inherit them
            os.environ[name] = runnerd.env[name]
        os.environ.pop("RUNNERD_RUN_ID", None)
        try:
            runnerd.start(20.0)
            if plan.tasks:
                if plan.bare:
                    bare.start(20.0)
                rounds = stage_overhead(plan, runnerd, bare, bench.quiet)
                bare.stop()
            if plan.kills:
                kills = stage_kills(plan, runnerd, root, bench.quiet)
        finally:
            bare.stop()
            runnerd.stop()
    bench.stop()
    return rounds, kills


def main() -> None:
    parser = arguments(__doc__, "1,000 tasks, 3 rounds each, 5 kills")
    parser.add_argument("--tasks", type=int, metavar="N", help="tasks per timed map (0: skip)")
    parser.add_argument("--rounds", type=int, metavar="N", help="timed maps per configuration")
    parser.add_argument("--kills", type=int, metavar="N", help="SIGKILLed workers (0: skip)")
    parser.add_argument(
        "--no-bare",
        action="store_true",
        help="skip the plugin against the bare server (one cluster fewer)",
    )
    args = parser.parse_args()
    bench = session(args)
    plan = QUICK if args.quick else FULL
    for name in ("tasks", "rounds", "kills"):
        if getattr(args, name) is not None:
            plan = replace(plan, **{name: max(0, getattr(args, name))})
    plan = replace(plan, rounds=max(1, plan.rounds), bare=not args.no_bare)
    rounds, kills = run(plan, bench)
    mode = "quick" if args.quick else "full"
    if (args.tasks, args.rounds, args.kills) != (None, None, None):
        mode = f"{plan.tasks}-task/{plan.kills}-kill"
    bench.header("dask", mode)
    if rounds:
        print_overhead(rounds, plan)
    if kills is not None:
        print_kills(kills)


if __name__ == "__main__":
    main()
