"""What the bench scripts share: a daemon in a temp folder (runnerd.testing's, the one the
tests start), the CPU it and the rest of the machine use, waiting for other heavy work,
forked client processes that pipeline requests, timing commands, and printing figures.

Bench scripts report; they assert nothing. Each imports this module (bench/ is the
script's own folder, so it is found as it is). Run as a script, it is the bare msgpack
server that bench_core and bench_dask measure runnerd against.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import multiprocessing as mp
import os
import re
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack

from runnerd.registry import Store
from runnerd.testing import Daemon
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    HEADER,
    Create,
    Get,
    Heartbeat,
    Request,
    Start,
    Status,
    Succeed,
    frame,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
FORK = mp.get_context("fork")
RUNNERCTL = [sys.executable, "-m", "runnerd.cli"]
FLOOR = ("  floor: python -c 'import runnerd.cli'", [sys.executable, "-c", "import runnerd.cli"])


# --- processes and their CPU --------------------------------------------------------


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


def machine_busy() -> float:
    """CPU-seconds every CPU has spent busy since boot (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu() -> float:
    """CPU-seconds of this process and its reaped children (daemons, clients, runnerctl)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_idle(pid: int, timeout: float = 300.0, probe: float = 0.5) -> float:
    """Wait until a process uses < 5% CPU; return how long it stayed busy."""
    began = busy_until = time.monotonic()
    while busy_until - began < timeout:
        before = cpu_seconds(pid)
        time.sleep(probe)
        if cpu_seconds(pid) - before < 0.05 * probe:
            break
        busy_until = time.monotonic()
    return busy_until - began


@dataclass
class Idle:
    """A process's CPU, wakeups and RSS over a quiet interval."""

    runs: int
    cpu_pct: float
    precise_pct: float
    wakeups: float
    rss_mb: float


def sample_idle(pid: int, seconds: float, runs: int) -> Idle:
    """CPU % (utime + stime, and schedstat), wakeups/s and the largest VmRSS over `seconds`."""
    cpu0, (ns0, sw0), t0 = cpu_seconds(pid), task_totals(pid), time.monotonic()
    peak = rss_mb(pid)
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, seconds - (time.monotonic() - t0)))
        peak = max(peak, rss_mb(pid))
    cpu1, (ns1, sw1), wall = cpu_seconds(pid), task_totals(pid), time.monotonic() - t0
    return Idle(
        runs, (cpu1 - cpu0) / wall * 100, (ns1 - ns0) / wall * 100, (sw1 - sw0) / wall, peak
    )


# --- the daemon ---------------------------------------------------------------------


@dataclass
class Runnerd(Daemon):
    """runnerd.testing's daemon, logging warnings only, with what the benches read of it."""

    log_level: str = "warning"

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def wait_idle(self, timeout: float = 300.0, probe: float = 0.5) -> float:
        """After a burst of acks the daemon may still be writing metadata.json files."""
        return wait_idle(self.pid, timeout, probe)

    def timed_start(self, timeout: float = 600.0) -> float:
        """Launch the daemon; the seconds until it answers a `status` request."""
        began = time.perf_counter()
        self.start(timeout)
        self.status(timeout)
        return time.perf_counter() - began

    def status(self, timeout: float = 60.0) -> dict[str, Any]:
        """The first `status` reply, retrying until the daemon answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect(timeout=max(deadline - time.monotonic(), 0.1)) as conn:
                    reply: dict[str, Any] = conn.call(
                        Status(), timeout=max(deadline - time.monotonic(), 0.1)
                    )
                    return reply
            except DaemonUnavailable:
                if (self.proc and self.proc.poll() is not None) or time.monotonic() > deadline:
                    raise RuntimeError(f"runnerd is not answering: {self.log_tail(2000)}") from None
                time.sleep(0.002)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self.status()["counts"]
        return counts

    @contextlib.contextmanager
    def connect(self, timeout: float = 5.0) -> Iterator[Connection]:
        conn = Connection(self.socket, timeout=timeout, client="bench")
        try:
            yield conn
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        return super().stop(sig, timeout)


@dataclass
class Bare(Runnerd):
    """The ceiling: a bare asyncio msgpack server that decodes each frame and answers ok."""

    def command(self) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--serve-bare", str(self.socket)]


async def _bare_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Decode each frame, answer {"id", "ok": True}: what any msgpack server must do."""
    try:
        while True:
            (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
            msg = msgpack.unpackb(await reader.readexactly(length), raw=False)
            reply: dict[str, Any] = {"id": msg.get("id"), "ok": True}
            if msg.get("op") == "hello":
                reply.update(daemon="bare/0", v=1)
            writer.write(frame(reply))
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve_bare(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    server = await asyncio.start_unix_server(_bare_connection, path)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


@contextlib.contextmanager
def temp_root() -> Iterator[Path]:
    """A short temp path (unix socket paths are limited to 107 bytes), always removed."""
    root = Path(tempfile.mkdtemp(prefix="rdb-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def registry(db: Path) -> Iterator[Store]:
    """The registry's own Store on a stopped daemon's file, committed on leaving: how a bench
    puts in runs it would take the daemon too long to make."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        yield Store(conn)


# --- other heavy work on the machine ------------------------------------------------


BENCH = r"bench_[a-z]+\.py"
OTHERS = rf"{BENCH}|fuzz\.py|chaos\.py|pytest"


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _ours(pid: int) -> bool:
    """This process, one of its ancestors (a shell running it), or one it forked."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        me, up = os.getpid(), pid
        while up > 1:
            if up == me:
                return True
            up = int(_stat(up)[1])
        mine = me
        while mine > 1:
            if mine == pid:
                return True
            mine = int(_stat(mine)[1])
    return False


@dataclass
class Quiet:
    """Waits while other heavy work runs: a bench script started before this one, the fuzzer,
    the chaos harness or pytest (never touching them). Remembers what and how long; `ours`
    counts the CPU our own idle processes burn meanwhile (not the machine's noise)."""

    enabled: bool = True
    notes: set[str] = field(default_factory=set)
    waited: float = 0.0
    busy: float = 0.0  # machine CPU-seconds spent while waiting
    own: float = 0.0  # of which ours
    ours: Callable[[], float] = lambda: 0.0

    def others(self) -> list[str]:
        found = subprocess.run(
            ["pgrep", "-af", OTHERS], capture_output=True, text=True
        ).stdout.splitlines()
        since = int(_stat(os.getpid())[19])
        others = []
        for line in found:
            pid, command = int(line.split(" ", 1)[0]), line.split(" ", 1)[-1]
            with contextlib.suppress(OSError):
                if not _ours(pid) and (
                    not re.search(BENCH, command) or int(_stat(pid)[19]) < since
                ):
                    others.append(command)
        return others

    def wait(self, poll: float = 3.0) -> None:
        began, busy0, own0 = time.monotonic(), machine_busy(), self.ours()
        while self.enabled and (found := self.others()):
            if not self.notes:
                print(f"waiting for: {found[0][:80]}", file=sys.stderr, flush=True)
            self.notes.update(command[:60] for command in found)
            time.sleep(poll)
        self.waited += time.monotonic() - began
        self.busy += machine_busy() - busy0
        self.own += self.ours() - own0


@dataclass
class Session:
    """One bench run: its wall time, less the waits, and the CPU other processes took
    meanwhile (the figures' noise)."""

    quiet: Quiet = field(default_factory=Quiet)
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    began: float = field(default_factory=time.monotonic)
    busy0: float = field(default_factory=machine_busy)
    own0: float = field(default_factory=own_cpu)
    wall: float = 0.0
    foreign: float = 0.0

    def stop(self) -> None:
        self.wall = time.monotonic() - self.began - self.quiet.waited
        self.foreign = (
            (machine_busy() - self.busy0)
            - (own_cpu() - self.own0)
            - (self.quiet.busy - self.quiet.own)
        )

    def header(self, what: str, mode: str) -> None:
        cpus = os.cpu_count() or 1
        share = self.foreign / (max(self.wall, 1e-9) * cpus)
        waited = f" (+{self.quiet.waited:.0f} s waiting for other load)" if self.quiet.notes else ""
        print(
            f"runnerd {what} benchmark, {mode} mode: {self.wall:.0f} s on {cpus} CPUs"
            f"{waited}; load average {self.load_before:.1f} before"
        )
        print(
            f"other processes used {self.foreign:.0f} CPU-s while it ran ({share:.0%} of the "
            "machine)" + ("  <- figures are noisy" if share > 0.05 else "")
        )
        if self.quiet.notes:
            print(f"waited for: {'; '.join(sorted(self.quiet.notes))[:300]}")


def arguments(doc: str | None, quick: str) -> argparse.ArgumentParser:
    """A bench script's options: --quick (what it does then), --no-wait."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="time even while other heavy work runs (see the header's noise)",
    )
    return parser


def session(args: argparse.Namespace) -> Session:
    """Start timing the bench run; a SIGTERM ends it through the cleanups."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return Session(Quiet(enabled=not args.no_wait))


# --- clients in forked processes ----------------------------------------------------


class Pipeline:
    """Keeps up to `window` request groups in flight on one Connection.

    A group is sent back to back; its last reply completes it. Completion times and
    latencies are taken in the reader thread, the moment the reply is delivered.
    """

    def __init__(self, conn: Connection, window: int) -> None:
        self.conn = conn
        self.window = window
        self.slots = threading.Semaphore(window)
        self.done = array.array("d")
        self.latency = array.array("d")
        self.errors: list[str] = []

    def submit(self, reqs: Sequence[Request], record: bool = True) -> None:
        self.slots.acquire()
        sent = time.monotonic()
        futures = [self.conn.send(req) for req in reqs]
        for fut in futures[:-1]:
            fut.add_done_callback(self._check)
        futures[-1].add_done_callback(lambda fut: self._complete(fut, sent, record))

    def _check(self, fut: Future[dict[str, Any]]) -> bool:
        exc = fut.exception()
        reply = None if exc is not None else fut.result()
        if reply is not None and reply.get("ok"):
            return True
        self.errors.append(repr(exc) if exc is not None else str(reply))
        return False

    def _complete(self, fut: Future[dict[str, Any]], sent: float, record: bool) -> None:
        now = time.monotonic()
        if self._check(fut) and record:
            self.done.append(now)
            self.latency.append(now - sent)
        self.slots.release()

    def drain(self) -> None:
        for _ in range(self.window):
            self.slots.acquire()
        for _ in range(self.window):
            self.slots.release()


Body = Callable[[int, Any], Any]


class Release:
    """Lets forked processes exit: they wait for the end of a pipe the parent closes (a
    process SIGKILLed while waiting holds no lock, as it would on a multiprocessing Event)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()

    def wait(self, timeout: float) -> None:
        """In a forked process: until the parent sets it (or `timeout`)."""
        os.close(self.write)
        select.select([self.read], [], [], timeout)

    def set(self) -> None:
        if self.write >= 0:
            os.close(self.write)
            os.close(self.read)
            self.write = -1


def _forked(body: Body, index: int, barrier: Any, queue: Any, release: Release) -> None:
    """Process body: one result on the queue, then live on until released, so the runs it
    left running stay attached to a live process (the daemon fails a run whose processes
    are all gone)."""
    try:
        result = body(index, barrier)
    except BaseException as exc:  # report anything, so the parent never waits forever
        with contextlib.suppress(Exception):
            barrier.abort()
        result = {"failed": f"client {index}: {exc!r}"}
    queue.put(result)
    release.wait(7200)


@contextlib.contextmanager
def forked(body: Body, procs: int, timeout: float = 1800.0) -> Iterator[tuple[list[Any], Release]]:
    """Run `body(index, barrier)` in `procs` forked processes; yield (their results, what
    lets them exit) while they live. Leaving the block lets them exit too."""
    barrier, queue, release = FORK.Barrier(procs), FORK.Queue(), Release()
    workers = [
        FORK.Process(target=_forked, args=(body, i, barrier, queue, release), daemon=True)
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        results = [queue.get(timeout=timeout) for _ in workers]
        failed = [r["failed"] for r in results if isinstance(r, dict) and "failed" in r]
        if failed:
            raise RuntimeError("; ".join(failed[:3]))
        yield results, release
    finally:
        release.set()
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.terminate()
                w.join()


MakeRequests = Callable[[int, int], list[Request]]


@contextlib.contextmanager
def fillers(
    sock: Path, total: int, procs: int, window: int, make: MakeRequests
) -> Iterator[tuple[float, int, Release]]:
    """Send `total` request groups `make(process, k)` from `procs` processes, `window` in
    flight each; yield (seconds, error replies, release event) while the processes live."""
    per = -(-total // procs)

    def fill(index: int, _barrier: Any) -> int:
        with contextlib.closing(Connection(sock, client="bench")) as conn:
            pipe = Pipeline(conn, window)
            for k in range(per):
                pipe.submit(make(index, k), record=False)
            pipe.drain()
            return len(pipe.errors)

    began = time.monotonic()
    with forked(fill, procs) as (results, release):
        yield time.monotonic() - began, sum(results), release


# --- timed workloads: heartbeats and lifecycles --------------------------------------


def create(run_id: str, experiment: str, variation: str, seed: int) -> Create:
    return Create(
        key=new_key(),
        run_id=run_id,
        experiment=experiment,
        variation=variation,
        params={"lr": 0.01, "seed": seed},
    )


def lifecycle(run_id: str, variation: str, k: int) -> list[Request]:
    return [
        create(run_id, "bench-lifecycle", variation, k),
        Start(key=new_key(), run_id=run_id),
        Succeed(key=new_key(), run_id=run_id),
    ]


def _timed(
    pipe: Pipeline, barrier: Any, seconds: float, step: Callable[[int], None]
) -> dict[str, Any]:
    """Call `step(k)` from the barrier on for `seconds`; what was sent when, and answered."""
    barrier.wait(timeout=120)
    start = time.monotonic()
    stop, k = start + seconds, 0
    while time.monotonic() < stop:
        k += 1
        step(k)
    end = time.monotonic()
    pipe.drain()
    return {
        "start": start,
        "end": end,
        "done": pipe.done.tobytes(),
        "latency": pipe.latency.tobytes(),
        "errors": len(pipe.errors),
        "error_sample": pipe.errors[:3],
    }


def heartbeats(sock: Path, window: int, seconds: float) -> Body:
    """Each client: a running run of its own, beating with `window` heartbeats in flight."""

    def body(index: int, barrier: Any) -> dict[str, Any]:
        with contextlib.closing(Connection(sock, client="bench")) as conn:
            run_id = new_run_id()
            conn.call(create(run_id, "bench-heartbeat", f"c{index}", index))
            conn.call(Start(key=new_key(), run_id=run_id))
            pipe = Pipeline(conn, window)
            result = _timed(
                pipe, barrier, seconds, lambda k: pipe.submit([Heartbeat(run_id=run_id, seq=k)])
            )
            conn.call(Succeed(key=new_key(), run_id=run_id))
            return result

    return body


def lifecycles(sock: Path, window: int, seconds: float) -> Body:
    """create+start+succeed; window 1: wait for each reply; window > 1: whole lifecycles
    back to back."""

    def body(index: int, barrier: Any) -> dict[str, Any]:
        with contextlib.closing(Connection(sock, client="bench")) as conn:
            pipe = Pipeline(conn, window)

            def step(k: int) -> None:
                reqs = lifecycle(new_run_id(), f"p{index}", k)
                if window > 1:
                    pipe.submit(reqs)
                    return
                for req in reqs:
                    pipe.submit([req], record=isinstance(req, Succeed))

            return _timed(pipe, barrier, seconds, step)

    return body


@dataclass
class Figures:
    """Rate over the interval all clients were sending, with latency percentiles."""

    rate: float
    count: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_per_ack_us: float = float("nan")
    drain_seconds: float = 0.0
    error_sample: list[str] = field(default_factory=list)


def summarize(results: list[dict[str, Any]]) -> Figures:
    """Count completions inside [latest start, earliest end] over every client."""
    lo = max(r["start"] for r in results)
    hi = min(r["end"] for r in results)
    if hi <= lo:  # clients did not overlap at all (a badly overloaded machine)
        lo, hi = min(r["start"] for r in results), max(r["end"] for r in results)
    count, latencies = 0, []
    for r in results:
        done, lat = array.array("d"), array.array("d")
        done.frombytes(r["done"])
        lat.frombytes(r["latency"])
        for t, dt in zip(done, lat, strict=True):
            if lo <= t <= hi:
                count += 1
                latencies.append(dt)
    seconds = max(hi - lo, 1e-9)
    return Figures(
        count / seconds,
        count,
        seconds,
        sum(r["errors"] for r in results),
        pct(latencies, 0.50) * 1e3,
        pct(latencies, 0.99) * 1e3,
        error_sample=[e for r in results for e in r["error_sample"]][:3],
    )


def measure(server: Runnerd, label: str, body: Body, procs: int, repeat: int = 1) -> Figures:
    """The best of `repeat` runs of `body` in `procs` clients (other load only ever slows a
    run down), with the server's CPU charged to each ack."""
    print(f"  {label} clients={procs}", file=sys.stderr, flush=True)
    best: Figures | None = None
    for _ in range(repeat):
        cpu0 = server.cpu()
        with forked(body, procs, timeout=600) as (results, _):
            figures = summarize(results)
        figures.cpu_per_ack_us = (server.cpu() - cpu0) / max(figures.count, 1) * 1e6
        if figures.errors:
            print(
                f"    {figures.errors} error replies, e.g. {figures.error_sample}", file=sys.stderr
            )
        best = figures if best is None or figures.rate > best.rate else best
    assert best is not None
    return best


# --- timing -------------------------------------------------------------------------


def time_command(argv: Sequence[str], env: dict[str, str], reps: int) -> list[float]:
    """Wall times of a command, after one untimed warm-up run that may write the bytecode
    cache (an installed package has one; PYTHONDONTWRITEBYTECODE would time compiling)."""
    warm = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(argv, env=warm, capture_output=True, check=True)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - began)
    return times


def time_request(sock: Path, req: Request, reps: int) -> list[float]:
    """Round trips of one request on an open connection (after an untimed one): the
    daemon's share of a command."""
    with contextlib.closing(Connection(sock, client="bench")) as conn:
        conn.call(req, timeout=300)
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            conn.call(req, timeout=300)
            times.append(time.perf_counter() - began)
    return times


def time_floor(reps: int) -> tuple[str, list[float]]:
    """Interpreter start-up plus the CLI's imports: what any runnerctl command costs."""
    label, argv = FLOOR
    return label, time_command(argv, dict(os.environ), reps)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class Kill:
    """One SIGKILL: when the daemon noticed it, and when the registry showed failed_crash."""

    noticed: float
    seen: float
    failure_class: str


def kill_and_watch(
    conn: Connection, pid: int, run_id: str, poll: float = 0.001, timeout: float = 30.0
) -> Kill:
    """SIGKILL a run's process and poll `get` until the run is failed_crash."""
    wall, began = time.time(), time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while True:
        run = conn.call(Get(run=run_id))["run"]
        if run["state"] == "failed_crash":
            seen = time.perf_counter() - began
            break
        if time.perf_counter() - began > timeout:
            raise RuntimeError(f"run {run_id} still {run['state']} {timeout} s after SIGKILL")
        time.sleep(poll)
    failure = run["failure"] or {}
    return Kill(
        max(0.0, epoch(failure.get("at") or run["ended_at"]) - wall),
        seen,
        str(failure.get("failure_class")),
    )


# --- output -------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values` (nan if there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def pct_row(label: str, values: Sequence[float], width: int) -> str:
    """`label`, then p50, p99 and max of `values` (seconds) in ms."""
    return (
        f"{label:<{width}} {pct(values, 0.5) * 1e3:>7.1f} {pct(values, 0.99) * 1e3:>7.1f} "
        f"{max(values) * 1e3:>7.1f}"
    )


def median_row(label: str, values: Sequence[float], width: int) -> str:
    """`label`, then the median and max of `values` (seconds) in ms."""
    return f"{label:<{width}} {statistics.median(values) * 1e3:>9.1f} {max(values) * 1e3:>7.1f}"


if __name__ == "__main__":
    asyncio.run(_serve_bare(Path(sys.argv[sys.argv.index("--serve-bare") + 1])))
