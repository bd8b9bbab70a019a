"""Liveness figures for runnerd: death detection, the idle cost of many timers, restart at scale.

Starts fresh daemons in a temp folder, drives them from forked client processes that use
`runnerd_client`, builds a large registry directly with sqlite3, prints tables and cleans
up. Not a test: it asserts nothing, it reports.

    /tmp/venv/bin/python bench/bench_liveness.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench_core import stop_process, wait_idle

import runnerd_client as rd
from runnerd.states import failure_record
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Create, Get, ListRuns, Request, Start, Status

CLK_TCK = os.sysconf("SC_CLK_TCK")
FORK = mp.get_context("fork")
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


FULL = Plan(kills=100, held_runs=100_000, registry_runs=1_000_000, registry_running=10_000)
QUICK = Plan(kills=20, held_runs=10_000, registry_runs=100_000, registry_running=1_000,
             idle_seconds=5.0)


# --- the daemon -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Daemon:
    """A runnerd subprocess with its own socket, registry and XDG folders under `root`."""

    root: Path
    log_level: str = "warning"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "rd.sock"

    @property
    def db(self) -> Path:
        return self.root / "state" / "registry.sqlite3"

    @property
    def log(self) -> Path:
        return self.root / "runnerd.log"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RUNNERD_SOCKET=str(self.socket), RUNNERD_DB=str(self.db),
                   XDG_DATA_HOME=str(self.root / "data"), XDG_CONFIG_HOME=str(self.root / "cfg"),
                   XDG_STATE_HOME=str(self.root / "state"), XDG_RUNTIME_DIR=str(self.root))
        env.pop("RUNNERD_RUN_ID", None)
        return env

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 600.0) -> float:
        """Launch the daemon; return the seconds until it answers a `status` request."""
        argv = [sys.executable, "-m", "runnerd", "--socket", str(self.socket),
                "--db", str(self.db), "--log-level", self.log_level]
        began = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, cwd=self.root,
                                         stderr=subprocess.STDOUT)
        self.status(timeout)
        return time.perf_counter() - began

    def status(self, timeout: float = 60.0) -> dict[str, Any]:
        """The first `status` reply, retrying until the daemon is there."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = Connection(self.socket, timeout=max(deadline - time.monotonic(), 0.1),
                                  client="bench_liveness")
                try:
                    reply: dict[str, Any] = conn.call(
                        Status(), timeout=max(deadline - time.monotonic(), 0.1))
                    return reply
                finally:
                    conn.close()
            except DaemonUnavailable:
                assert self.proc is not None
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"runnerd is not answering: {self.log_tail()}") from None
                time.sleep(0.002)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self.status()["counts"]
        return counts

    def log_tail(self, size: int = 2000) -> str:
        return self.log.read_text()[-size:] if self.log.exists() else ""

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def wait_idle(self, timeout: float = 600.0, probe: float = 0.5) -> float:
        """Wait until the daemon uses < 5% CPU (metadata.json backlog); return seconds busy."""
        return wait_idle(self.pid, timeout, probe)

    def stop(self, timeout: float = 120.0) -> None:
        stop_process(self.proc, "runnerd", timeout)


# --- long-lived filler processes ------------------------------------------------


MakeRequests = Callable[[int, int], list[Request]]


def _pipelined(conn: Connection, count: int, window: int, index: int,
               make: MakeRequests) -> int:
    """Send `count` request groups with up to `window` in flight; return the error replies."""
    slots, errors = threading.Semaphore(window), [0]

    def done(fut: Any, last: bool) -> None:
        reply = None if fut.exception() else fut.result()
        if not (reply and reply.get("ok")):
            errors[0] += 1
        if last:
            slots.release()

    for k in range(count):
        slots.acquire()
        reqs = make(index, k)
        for i, req in enumerate(reqs):
            conn.send(req).add_done_callback(partial(done, last=i == len(reqs) - 1))
    for _ in range(window):
        slots.acquire()
    return errors[0]


def _filler(sock: str, index: int, count: int, window: int, make: MakeRequests,
            queue: Any, release: Any) -> None:
    """Process body: fill, report, then live on until released (its runs stay attached)."""
    try:
        conn = Connection(sock, client="bench_liveness")
        try:
            result: Any = _pipelined(conn, count, window, index, make)
        finally:
            conn.close()
    except BaseException as exc:  # report anything, so the parent never waits forever
        result = f"filler {index}: {exc!r}"
    queue.put(result)
    release.wait(3600)


@contextlib.contextmanager
def fillers(sock: Path, total: int, procs: int, window: int,
            make: MakeRequests) -> Iterator[tuple[float, int, Any]]:
    """Fill from `procs` processes; yield (seconds, error replies, release event) while they live.

    Setting the release event lets the processes exit; leaving the block does too.
    """
    queue, release = FORK.Queue(), FORK.Event()
    per = -(-total // procs)
    workers = [FORK.Process(target=_filler, args=(str(sock), i, per, window, make, queue,
                                                  release), daemon=True) for i in range(procs)]
    began = time.monotonic()
    for w in workers:
        w.start()
    try:
        results = [queue.get(timeout=1800) for _ in workers]
        failed = [r for r in results if isinstance(r, str)]
        if failed:
            raise RuntimeError("; ".join(failed[:3]))
        yield time.monotonic() - began, sum(results), release
    finally:
        release.set()
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.terminate()
                w.join()


# --- stage 1: death detection ---------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL: when the daemon noticed it, and when the registry showed failed_crash."""

    noticed: float
    seen: float
    failure_class: str


def _victim(sock: str, index: int, queue: Any) -> None:
    """A client process: create and start a run with the client library, then wait to die."""
    try:
        run = rd.connect(sock).run("bench-liveness", f"victim-{index}",
                                   heartbeat_timeout=3600).start()
        queue.put((index, run.run_id))
    except BaseException as exc:
        queue.put((index, f"error: {exc!r}"))
    time.sleep(3600)


def spawn_victims(sock: Path, count: int, first: int) -> list[tuple[Any, str]]:
    """`count` forked clients, each with a running run: [(process, run_id)]."""
    queue = FORK.Queue()
    procs = {first + i: FORK.Process(target=_victim, args=(str(sock), first + i, queue),
                                     daemon=True) for i in range(count)}
    for p in procs.values():
        p.start()
    out = []
    for _ in procs:
        index, run_id = queue.get(timeout=60)
        if run_id.startswith("error"):
            raise RuntimeError(f"victim {index}: {run_id}")
        out.append((procs[index], run_id))
    return out


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def kill_and_watch(conn: Connection, proc: Any, run_id: str, poll: float = 0.001,
                   timeout: float = 30.0) -> Kill:
    """SIGKILL a client and poll `get` until its run is failed_crash."""
    state = conn.call(Get(run=run_id))["run"]["state"]
    if state != "running":
        raise RuntimeError(f"run {run_id} is {state} before the kill")
    wall, began = time.time(), time.perf_counter()
    os.kill(proc.pid, signal.SIGKILL)
    while True:
        run = conn.call(Get(run=run_id))["run"]
        if run["state"] == "failed_crash":
            seen = time.perf_counter() - began
            break
        if time.perf_counter() - began > timeout:
            raise RuntimeError(f"run {run_id} still {run['state']} {timeout} s after SIGKILL")
        time.sleep(poll)
    proc.join()
    failure = run["failure"] or {}
    return Kill(max(0.0, _epoch(failure.get("at") or run["ended_at"]) - wall), seen,
                str(failure.get("failure_class")))


def stage_kills(daemon: Daemon, plan: Plan) -> list[Kill]:
    """SIGKILL `plan.kills` clients, one at a time, spawned in batches."""
    print(f"death detection: {plan.kills} SIGKILLs", file=sys.stderr, flush=True)
    kills: list[Kill] = []
    conn = Connection(daemon.socket, client="bench_liveness")
    try:
        while len(kills) < plan.kills:
            batch = spawn_victims(daemon.socket, min(plan.kill_batch, plan.kills - len(kills)),
                                  len(kills))
            time.sleep(0.05)  # let the daemon settle after the batch's creates
            kills += [kill_and_watch(conn, proc, run_id) for proc, run_id in batch]
    finally:
        conn.close()
    return kills


# --- stage 2: idle cost of many running runs ------------------------------------


@dataclass
class Idle:
    """Daemon CPU, wakeups and RSS over a quiet interval."""

    runs: int
    cpu_pct: float
    precise_pct: float
    wakeups: float
    rss_mb: float


def task_totals(pid: int) -> tuple[float, int]:
    """(on-CPU seconds in ns precision, context switches) summed over a process's threads."""
    ns, switches = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            ns += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    switches += int(line.split()[1])
    return ns / 1e9, switches


def sample_idle(daemon: Daemon, seconds: float, runs: int) -> Idle:
    """CPU % (utime + stime, and schedstat), wakeups/s and the largest VmRSS over `seconds`."""
    cpu0, (ns0, sw0), t0 = daemon.cpu(), task_totals(daemon.pid), time.monotonic()
    peak = rss_mb(daemon.pid)
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, seconds - (time.monotonic() - t0)))
        peak = max(peak, rss_mb(daemon.pid))
    cpu1, (ns1, sw1), wall = daemon.cpu(), task_totals(daemon.pid), time.monotonic() - t0
    return Idle(runs, (cpu1 - cpu0) / wall * 100, (ns1 - ns0) / wall * 100, (sw1 - sw0) / wall,
                peak)


def _create_start(index: int, k: int) -> list[Request]:
    run_id = new_run_id()
    return [Create(key=new_key(), run_id=run_id, experiment="bench-hold",
                   variation=f"h{index}-{k % 100}", params={"k": k}),
            Start(key=new_key(), run_id=run_id, heartbeat_timeout=3600.0)]


@dataclass
class Hold:
    """The hold stage: idle figures empty and full, and what filling and dying cost."""

    empty: Idle
    full: Idle | None = None
    fill_seconds: float = 0.0
    fill_errors: int = 0
    backlog_seconds: float = 0.0
    mass_death_seconds: float = float("nan")
    notes: list[str] = field(default_factory=list)


def stage_hold(daemon: Daemon, plan: Plan) -> Hold:
    """Idle CPU/RSS empty, then holding `plan.held_runs` running runs, then their holders die."""
    wait_quiet()
    hold = Hold(empty=sample_idle(daemon, plan.idle_seconds, 0))
    print(f"holding {plan.held_runs} running runs", file=sys.stderr, flush=True)
    with fillers(daemon.socket, plan.held_runs, plan.fill_procs, plan.fill_window,
                 _create_start) as (seconds, errors, release):
        hold.fill_seconds, hold.fill_errors = seconds, errors
        hold.backlog_seconds = daemon.wait_idle()
        running = daemon.counts().get("running", 0)
        wait_quiet()
        hold.full = sample_idle(daemon, plan.idle_seconds, running)
        print("releasing the holders", file=sys.stderr, flush=True)
        hold.mass_death_seconds = time_mass_death(daemon, release)
    return hold


def time_mass_death(daemon: Daemon, release: Any, timeout: float = 600.0) -> float:
    """Let every holder exit at once; seconds until no run is left running.

    Polls with a cheap indexed query every 20 ms (a `status` would count every run).
    """
    conn = Connection(daemon.socket, client="bench_liveness")
    try:
        began = time.monotonic()
        release.set()
        while conn.call(ListRuns(state="running", limit=1), timeout=60)["runs"]:
            if time.monotonic() - began > timeout:
                return float("nan")
            time.sleep(0.02)
        return time.monotonic() - began
    finally:
        conn.close()


# --- stage 3: restart with a large registry -------------------------------------


@dataclass(frozen=True)
class Shape:
    """A failure record's fixed part; the message gets a run-specific number."""

    failure_class: str
    template: str
    record: dict[str, Any]


def failure_shapes() -> list[Shape]:
    texts = [("RuntimeError", "CUDA out of memory. Tried to allocate {n} MiB"),
             ("ValueError", "loss is nan at step {n}"),
             ("KeyError", "missing column id_{n}"),
             ("TimeoutError", "rank {n} did not answer"),
             ("FileNotFoundError", "no checkpoint at /data/ckpt/{n}.pt")]
    return [Shape(c, t, failure_record(c, t.format(n=1), "crash", 0.0)) for c, t in texts]


def _insert(conn: sqlite3.Connection, table: str, rows: Iterator[dict[str, Any]]) -> None:
    """Insert dict rows into a table of the daemon's schema (read from the file).

    A column the schema requires that the rows lack, or a key it does not know, is an error
    that names it: the daemon's schema moved on and this bench must follow.
    """
    first = next(rows, None)
    if first is None:
        return
    schema = conn.execute(f"PRAGMA table_info({table})").fetchall()
    known = {str(r[1]) for r in schema}
    required = {str(r[1]) for r in schema if r[3] and r[4] is None}
    if required - first.keys() or first.keys() - known:
        raise RuntimeError(f"{table}: schema requires {sorted(required - first.keys())}, "
                           f"lacks {sorted(first.keys() - known)}; update the bench")
    cols = list(first)
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    conn.execute(sql, tuple(first.values()))
    conn.executemany(sql, (tuple(row[c] for c in cols) for row in rows))


@dataclass(frozen=True)
class Layout:
    """Which runs of the synthetic registry are in which state."""

    total: int
    running: int
    live: int
    now: float
    data: Path

    def state(self, i: int) -> str:
        if i >= self.total - self.running:
            return "running"
        bucket = i % 100
        return ("succeeded" if bucket < 80 else "failed_crash" if bucket < 95
                else "failed_abandoned" if bucket < 98 else "failed_timeout")

    def created(self, i: int) -> float:
        if i >= self.total - self.running:
            return self.now - 3600 + (i - self.total + self.running) * 0.01
        return self.now - 30 * 86400 + i * (29 * 86400 / self.total)


def run_rows(lay: Layout, ids: list[str]) -> Iterator[dict[str, Any]]:
    for i, run_id in enumerate(ids):
        state, created = lay.state(i), lay.created(i)
        running = state == "running"
        yield {"run_id": run_id, "experiment": f"exp-{i % 100}",
               "variation": f"v{(i // 100) % 100}", "attempt": i // 10_000 + 1, "state": state,
               "params": f'{{"lr": 0.01, "seed": {i}}}', "tags": "{}", "cwd": "/tmp",
               "run_dir": str(lay.data / "runnerd" / "runs" / run_id), "host": "bench",
               "created_at": created, "started_at": created + 1.0,
               "ended_at": None if running else created + 1.0 + i % 600,
               "last_heartbeat_at": lay.now - i % 300 if running else created + 1.0 + i % 600,
               "heartbeat_seq": 5, "heartbeats": 5, "heartbeat_timeout": 900.0,
               "lost_grace": 172800.0}


def failure_rows(lay: Layout, ids: list[str]) -> Iterator[dict[str, Any]]:
    shapes = failure_shapes()
    for i, run_id in enumerate(ids):
        state = lay.state(i)
        if not state.startswith("failed"):
            continue
        shape = shapes[i % len(shapes)]
        at = lay.created(i) + 1.0 + i % 600
        reason = {"failed_crash": "crash", "failed_abandoned": "abandoned"}.get(state, "timeout")
        yield {**shape.record, "run_id": run_id, "message": shape.template.format(n=i % 977),
               "reason": reason, "at": at}


def transition_rows(lay: Layout, ids: list[str]) -> Iterator[dict[str, Any]]:
    """One transition per run (its last), so the table is not empty."""
    for i, run_id in enumerate(ids):
        state = lay.state(i)
        yield {"run_id": run_id, "at": lay.created(i) + 1.0,
               "from_state": "pending" if state == "running" else "running", "to_state": state,
               "cause": "start" if state == "running" else "bench", "source": "bench"}


def dead_pids(count: int) -> list[int]:
    """Pid numbers no process has right now (stored with a start time, so reuse is harmless)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    taken = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    free = [p for p in range(300, min(pid_max, 300 + count + len(taken))) if p not in taken]
    return [free[i % len(free)] for i in range(count)]


def pid_rows(lay: Layout, ids: list[str], live: tuple[int, int]) -> Iterator[dict[str, Any]]:
    first = lay.total - lay.running
    dead = dead_pids(lay.running)
    for j, run_id in enumerate(ids[first:]):
        pid, start = live if j < lay.live else (dead[j], 4242)
        yield {"run_id": run_id, "pid": pid, "start_time": start, "at": lay.now - 3600}


def build_registry(db: Path, lay: Layout, live: tuple[int, int]) -> float:
    """Fill the daemon-made registry file with `lay.total` runs; return the seconds it took."""
    began = time.monotonic()
    t0 = lay.now - 30 * 86400
    ids = [new_run_id(now=t0 + i * 0.002) for i in range(lay.total)]
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        for table, rows in (("runs", run_rows(lay, ids)), ("failures", failure_rows(lay, ids)),
                            ("transitions", transition_rows(lay, ids)),
                            ("run_pids", pid_rows(lay, ids, live))):
            _insert(conn, table, rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.monotonic() - began


def process_start_time(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2:].split()[19])


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


def stage_restart(root: Path, plan: Plan) -> Restart:
    """Build a registry of `plan.registry_runs` runs and time a daemon start on it, twice."""
    daemon = Daemon(root, log_level="info")
    res = Restart(plan.registry_runs, plan.registry_running)
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        daemon.start()  # the daemon makes the schema
        daemon.stop()
        print(f"building a registry of {plan.registry_runs} runs", file=sys.stderr, flush=True)
        lay = Layout(plan.registry_runs, plan.registry_running, plan.live_running, time.time(),
                     root / "data")
        res.build_seconds = build_registry(
            daemon.db, lay, (sleeper.pid, process_start_time(sleeper.pid)))
        res.db_mb = daemon.db.stat().st_size / 1e6
        wait_quiet()
        print("restarting on it", file=sys.stderr, flush=True)
        res.to_status = daemon.start()
        res.recovered_line, res.recover_seconds = recovered(daemon.log.read_text())
        res.busy_after = daemon.wait_idle()
        res.counts = daemon.counts()
        daemon.stop()
        wait_quiet()
        res.second_start = daemon.start()
        _, res.second_recover = recovered(daemon.log.read_text())
    finally:
        daemon.stop()
        sleeper.kill()
        sleeper.wait()
    return res


# --- machine etiquette ------------------------------------------------------------


def others_running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


NOTICED: set[str] = set()


def wait_quiet(poll: float = 3.0) -> float:
    """Wait while bench_core.py runs (never touching it); note a test suite running alongside."""
    began = time.monotonic()
    while others_running("bench_core"):
        if "bench_core" not in NOTICED:
            print("waiting for bench_core.py to finish", file=sys.stderr, flush=True)
        NOTICED.add("bench_core")
        time.sleep(poll)
    if others_running("pytest"):
        NOTICED.add("pytest")
    return time.monotonic() - began


def machine_busy() -> float:
    """CPU-seconds every CPU has spent busy since boot (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu() -> float:
    """CPU-seconds of this process and its reaped children (daemons, clients)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --- output -----------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def print_kills(kills: list[Kill]) -> None:
    print(f"\nDeath detection: {len(kills)} SIGKILLed clients, one at a time")
    print(f"{'from the SIGKILL to':<52} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for label, values in (("the daemon noticing (failure 'at', ms resolution)",
                           [k.noticed for k in kills]),
                          ("`get` showing failed_crash (polled every 1 ms)",
                           [k.seen for k in kills])):
        print(f"{label:<52} {_pct(values, 0.5) * 1e3:>7.1f} {_pct(values, 0.99) * 1e3:>7.1f} "
              f"{max(values) * 1e3:>7.1f}")
    classes = sorted({k.failure_class for k in kills})
    p99 = _pct([k.seen for k in kills], 0.99)
    print(f"failure_class: {', '.join(classes)}; target (SPEC §2): failed_crash within 1 s: "
          f"p99 {p99 * 1e3:.0f} ms {_verdict(p99 < 1.0)}")


def print_hold(hold: Hold, plan: Plan) -> None:
    tick = 100 / CLK_TCK / plan.idle_seconds
    print(f"\nIdle daemon over {plan.idle_seconds:g} s (CPU % = utime+stime / wall, resolution "
          f"{tick:.2f}%; schedstat: the same in ns; wakeups: context switches/s, all threads)")
    print(f"{'running runs held':>17} {'CPU %':>6} {'schedstat %':>11} {'wakeups/s':>9} "
          f"{'RSS MB':>7}")
    for idle in (hold.empty, hold.full):
        if idle is not None:
            print(f"{idle.runs:>17} {idle.cpu_pct:>6.2f} {idle.precise_pct:>11.3f} "
                  f"{idle.wakeups:>9.1f} {idle.rss_mb:>7.1f}")
    rate = plan.held_runs / hold.fill_seconds if hold.fill_seconds else float("nan")
    print(f"filled {plan.held_runs} create+start (heartbeat_timeout 3600 s) from "
          f"{plan.fill_procs} processes in {hold.fill_seconds:.1f} s ({rate:.0f}/s, "
          f"{hold.fill_errors} errors); daemon busy {hold.backlog_seconds:.1f} s more "
          "(metadata.json)")
    print(f"then all {plan.fill_procs} holders exited at once: every run failed_crash after "
          f"{hold.mass_death_seconds:.1f} s")
    if hold.full is not None:
        print(f"target: idle CPU < 1% with {hold.full.runs} runs: {hold.full.precise_pct:.3f}% "
              f"{_verdict(hold.full.precise_pct < 1.0)}")


def print_restart(res: Restart) -> None:
    print(f"\nRestart on a registry of {res.runs} runs, {res.running} of them running "
          f"(all but 10 attached to dead pids)")
    print(f"built with sqlite3 in {res.build_seconds:.1f} s: {res.db_mb:.0f} MB")
    print(f"{'start':<44} {'to status s':>11} {'recover s':>9}")
    print(f"{'first (reconciles the dead runs)':<44} {res.to_status:>11.2f} "
          f"{res.recover_seconds:>9.3f}")
    print(f"{'second (nothing left to reconcile)':<44} {res.second_start:>11.2f} "
          f"{res.second_recover:>9.3f}")
    print(f"log: {res.recovered_line}")
    print(f"daemon busy {res.busy_after:.1f} s after the first status answer (metadata.json, "
          "crash-file scans)")
    print("counts after: " + ", ".join(f"{n} {s}" for s, n in sorted(res.counts.items())))
    print(f"target: reconcile {res.runs} runs < 10 s: {res.to_status:.1f} s "
          f"{_verdict(res.to_status < 10)}")


@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    hold: Hold | None = None
    restart: Restart | None = None
    wall_seconds: float = 0.0
    foreign_cpu: float = 0.0


def print_header(report: Any, mode: str, what: str = "liveness") -> None:
    """Wall time and how much of the machine other processes took (the figures' noise)."""
    cpus = os.cpu_count() or 1
    foreign = report.foreign_cpu / (report.wall_seconds * cpus)
    print(f"runnerd {what} benchmark, {mode} mode: {report.wall_seconds:.0f} s on {cpus} CPUs")
    print(f"other processes used {report.foreign_cpu:.0f} CPU-s meanwhile "
          f"({foreign:.0%} of the machine)" + ("  <- figures are noisy" if foreign > 0.05 else "")
          + (f"; seen running alongside: {', '.join(sorted(NOTICED))}" if NOTICED else ""))


# --- main -------------------------------------------------------------------------


@contextlib.contextmanager
def temp_root() -> Iterator[Path]:
    """A short temp path (unix socket paths are limited to 107 bytes), always removed."""
    root = Path(tempfile.mkdtemp(prefix="rdl-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(plan: Plan) -> Report:
    """The three stages; every daemon is stopped and every folder removed whatever happens."""
    report = Report()
    busy0, own0, began = machine_busy(), own_cpu(), time.monotonic()
    with temp_root() as root:
        daemon = Daemon(root / "a")
        daemon.root.mkdir()
        os.environ.update(daemon.env)  # forked clients put spools and run folders under root
        try:
            wait_quiet()
            daemon.start()
            report.kills = stage_kills(daemon, plan)
            report.hold = stage_hold(daemon, plan)
        finally:
            daemon.stop()
        (root / "b").mkdir()
        report.restart = stage_restart(root / "b", plan)
    report.wall_seconds = time.monotonic() - began
    report.foreign_cpu = (machine_busy() - busy0) - (own_cpu() - own0)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="20 kills, 10,000 held runs, a 100,000-run registry (< 60 s)")
    parser.add_argument("--kills", type=int, help="override the number of SIGKILLs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = QUICK if args.quick else FULL
    if args.kills:
        plan = replace(plan, kills=args.kills)
    report = run(plan)
    print_header(report, "quick" if args.quick else "full")
    print_kills(report.kills)
    if report.hold is not None:
        print_hold(report.hold, plan)
    if report.restart is not None:
        print_restart(report.restart)


if __name__ == "__main__":
    main()
