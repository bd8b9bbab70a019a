"""Figures for many nodes: how long a change takes to reach the mirror's files, and what
mirroring costs the daemon, at a steady rate of run lifecycles; how long `runnerctl --dask`
takes with two workers (two emulated nodes) and 100,000 runs per node.

Mirror: a fresh daemon with and then without `--mirror` (a folder on this machine's disk:
a network filesystem adds its own round trips), one client sending create + start + succeed
at RATE lifecycles/s, and a reader tailing the node's segment files every 2 ms; the lag of
a run is from its succeed's acknowledgement to its `succeeded` line in the file. --dask:
two daemons on registries of N runs each, a LocalCluster with one `dask worker` per daemon,
and runnerctl commands timed through Dask and, for comparison, over both sockets.
Not a test: it reports.

    python bench/bench_mirror.py [--quick] [--rate N] [--seconds S] [--runs N] [--rounds N]
                                 [--only COMMAND] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    RUNNERCTL,
    Runnerd,
    arguments,
    pct,
    registry,
    session,
    temp_root,
    time_command,
)

from runnerd.registry import NewRun, RunUpdate, Store
from runnerd.states import failure_record
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Create, Start, State, Succeed


@dataclass
class Lag:
    """One mode's run: acknowledgement and file times per run, and the daemon's CPU."""

    acked: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    sent: int = 0
    cpu: float = 0.0
    seconds: float = 0.0

    def lags(self) -> list[float]:
        return [self.seen[r] - t for r, t in self.acked.items() if r in self.seen]


class Tail:
    """Reads what is appended to a node folder's segments, every 2 ms, in a thread: the
    time each run's `succeeded` line first appears."""

    def __init__(self, shared: Path, seen: dict[str, float]) -> None:
        self.shared, self.seen = shared, seen
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.002):
            for path in sorted(self.shared.glob("*/runs-*.jsonl")):
                self._read(path)

    def _read(self, path: Path) -> None:
        try:
            with path.open("rb") as file:
                file.seek(self.offsets.get(path, 0))
                data = self.partial.pop(path, b"") + file.read()
                self.offsets[path] = file.tell()
        except FileNotFoundError:
            return
        now = time.time()
        *lines, rest = data.split(b"\n")
        if rest:
            self.partial[path] = rest
        for line in lines:
            record = json.loads(line)
            if record["state"] == "succeeded":
                self.seen.setdefault(record["run_id"], now)


def drive(daemon: Runnerd, rate: float, seconds: float, lag: Lag) -> None:
    """`rate` lifecycles a second from one connection, each acked time noted."""
    conn = Connection(daemon.socket, client="bench")
    began = time.monotonic()
    cpu0 = daemon.cpu()
    try:
        n = 0
        while (due := began + n / rate) < began + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            run_id = new_run_id()
            futures = conn.send_many(
                [
                    Create(
                        key=new_key(),
                        run_id=run_id,
                        experiment="bench-mirror",
                        variation=f"v{n % 100}",
                    ),
                    Start(key=new_key(), run_id=run_id),
                    Succeed(key=new_key(), run_id=run_id),
                ]
            )
            futures[-1].add_done_callback(
                lambda _, run_id=run_id: lag.acked.setdefault(run_id, time.time())
            )
            n += 1
        lag.sent = n
        deadline = time.monotonic() + 60
        while len(lag.acked) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        lag.seconds = time.monotonic() - began
        lag.cpu = daemon.cpu() - cpu0
    finally:
        conn.close()


def mirror_run(root: Path, rate: float, seconds: float, mirror: bool) -> Lag:
    shared = root / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    daemon = Runnerd(
        root / ("m" if mirror else "p"), extra_args=["--mirror", str(shared)] if mirror else []
    )
    lag = Lag()
    tail = Tail(shared, lag.seen) if mirror else None
    try:
        daemon.start()
        drive(daemon, rate, seconds, lag)
        deadline = time.monotonic() + 30
        while mirror and len(lag.seen) < lag.sent and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if tail is not None:
            tail.stop.set()
            tail.thread.join()
        daemon.stop()
    return lag


def print_mirror(rate: float, plain: list[Lag], mirrored: list[Lag]) -> None:
    lags = [lag for run in mirrored for lag in run.lags()]
    sent = sum(run.sent for run in mirrored)
    print(
        f"\nMirror lag at {rate:g} lifecycles/s (create + start + succeed), {sent} runs in "
        f"{len(mirrored)} round(s)"
    )
    print(
        f"  from the succeed's ack to its line in the file: p50 {pct(lags, 0.5) * 1e3:.0f} ms,"
        f" p99 {pct(lags, 0.99) * 1e3:.0f} ms, max {max(lags, default=0) * 1e3:.0f} ms; "
        f"{len(lags)} of {sent} runs seen"
    )
    without = statistics.median(run.cpu / run.seconds for run in plain)
    with_ = statistics.median(run.cpu / run.seconds for run in mirrored)
    print(
        f"  daemon CPU (median of the rounds): {without:.1%} of a core without the mirror, "
        f"{with_:.1%} with it ({with_ - without:+.1%}, "
        f"{(with_ - without) / rate * 1e6:+.0f} us per lifecycle)"
    )


# --- --dask with many runs ------------------------------------------------------------


def fill(db: Path, runs: int, now: float, chunk: int = 20_000) -> None:
    """`runs` ended runs over 30 days, one in ten failed, as the daemon would have made them."""
    step = 30 * 86400 / runs
    for first in range(0, runs, chunk):
        with registry(db) as store:
            for i in range(first, min(first + chunk, runs)):
                add_run(store, i, now - 30 * 86400 + i * step)


def add_run(store: Store, i: int, created: float) -> None:
    run_id = new_run_id(now=created)
    store.runs.create(
        NewRun(
            run_id=run_id,
            experiment=f"exp-{i % 20}",
            variation=f"v{i % 1000}",
            params_json=f'{{"seed": {i}}}',
            tags_json="{}",
            created_at=created,
            host="bench",
        ),
        "bench",
    )
    store.runs.set_state(
        store.runs.require(run_id),
        State.RUNNING,
        at=created + 1,
        cause="start",
        source="bench",
        change=RunUpdate(started_at=created + 1),
    )
    end = State.FAILED_CRASH if i % 10 == 0 else State.SUCCEEDED
    if end == State.FAILED_CRASH:
        store.failures.put(
            run_id,
            failure_record("ValueError", f"loss is nan at step {i % 977}", "crash", created + 60),
        )
    store.runs.set_state(
        store.runs.require(run_id),
        end,
        at=created + 60,
        cause="bench",
        source="bench",
        change=RunUpdate(ended_at=created + 60),
    )


COMMANDS = (
    ("status", ["status"]),
    ("list (50)", ["list"]),
    ("list --limit 10000", ["list", "--limit", "10000"]),
    ("failures --group-by class", ["failures", "--group-by", "class"]),
    ("diagnose --since 30d", ["diagnose", "--since", "30d"]),
    ("report --since 30d", ["report", "--since", "30d"]),
)


def filled(db: Path, runs: int, kept: Path | None) -> None:
    """`db` with `runs` runs: filled, or copied from `kept` (a folder of registries filled
    by an earlier run with as many runs), where it is then kept for the next run."""
    copy = kept / f"{db.parent.parent.name}-{runs}.sqlite3" if kept is not None else None
    if copy is not None and copy.exists():
        print(f"  {db}: {runs:,} runs from {copy}", file=sys.stderr, flush=True)
        shutil.copyfile(copy, db)
        return
    print(f"  filling {db} with {runs:,} runs", file=sys.stderr, flush=True)
    fill(db, runs, time.time())
    if copy is not None:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(db, copy)


def dask_queries(
    root: Path, runs: int, reps: int, only: str | None, kept: Path | None
) -> dict[str, tuple[list[float], list[float]]]:
    """Each command's wall times through Dask and over the two sockets."""
    from distributed import Client, LocalCluster

    nodes = [Runnerd(root / name) for name in ("a", "b")]
    workers: list[subprocess.Popen[bytes]] = []
    cluster = client = None
    try:
        for node in nodes:
            node.start()
            node.stop()
            filled(node.db, runs, kept)
            node.start()
        cluster = LocalCluster(n_workers=0, dashboard_address=":0")
        client = Client(cluster)
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    cluster.scheduler_address,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--no-dashboard",
                ],
                env=node.env,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for node in nodes
        ]
        client.wait_for_workers(2, timeout=120)
        env = nodes[0].env
        sockets = [arg for node in nodes for arg in ("--socket", str(node.socket))]
        times = {}
        for label, args in COMMANDS:
            if only is not None and label != only:
                continue
            print(f"  {label}", file=sys.stderr, flush=True)
            through = time_command(
                [*RUNNERCTL, "--dask", cluster.scheduler_address, *args, "--json"], env, reps
            )
            direct = time_command([*RUNNERCTL, *sockets, *args, "--json"], env, reps)
            times[label] = (through, direct)
        return times
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        for worker in workers:
            os.killpg(worker.pid, 9)
            worker.wait()
        for node in nodes:
            node.stop()


def print_dask(runs: int, times: dict[str, tuple[list[float], list[float]]]) -> None:
    print(
        f"\nrunnerctl --dask with 2 workers (2 nodes) and {runs:,} runs per node, "
        "wall time of the whole command (median of the runs)"
    )
    print(f"  {'command':<28} {'--dask':>9} {'--socket x2':>12}")
    for label, (through, direct) in times.items():
        print(
            f"  {label:<28} {statistics.median(through) * 1e3:>7.0f} ms "
            f"{statistics.median(direct) * 1e3:>9.0f} ms"
        )


def main() -> None:
    parser = arguments(__doc__, "8 s per mirror mode, 20,000 runs per node, one timing each")
    parser.add_argument("--rate", type=float, default=100.0, help="lifecycles a second")
    parser.add_argument("--seconds", type=float, help="per mirror mode (default 30)")
    parser.add_argument("--runs", type=int, help="per node for --dask (default 100,000)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="mirror rounds, without and with alternately"
    )
    parser.add_argument("--no-dask", action="store_true", help="only the mirror figures")
    parser.add_argument(
        "--only", choices=[label for label, _ in COMMANDS], help="--dask: time this command only"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="--dask: keep the filled registries in DIR and reuse them (compare two versions "
        "on the same runs; --rounds 0 times the queries only)",
    )
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    runs = args.runs or (20_000 if args.quick else 100_000)
    reps = 1 if args.quick else 3
    run = session(args)
    results: list[Callable[[], None]] = []
    with temp_root() as root:
        plain: list[Lag] = []
        mirrored: list[Lag] = []
        for n in range(args.rounds):
            for mode, into in ((False, plain), (True, mirrored)):
                run.quiet.wait()
                print(
                    f"mirror round {n + 1}: {'with' if mode else 'without'}",
                    file=sys.stderr,
                    flush=True,
                )
                into.append(mirror_run(root / f"{n}", args.rate, seconds, mirror=mode))
        if mirrored:
            results.append(lambda: print_mirror(args.rate, plain, mirrored))
        if not args.no_dask:
            run.quiet.wait()
            print("--dask", file=sys.stderr, flush=True)
            times = dask_queries(root, runs, reps, args.only, args.keep)
            results.append(lambda: print_dask(runs, times))
    run.stop()
    run.header("mirror and --dask", "quick" if args.quick else "full")
    for show in results:
        show()


if __name__ == "__main__":
    main()
