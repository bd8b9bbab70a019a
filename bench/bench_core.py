"""Core figures for runnerd: heartbeats, lifecycles, `runnerctl status` at scale, and a ceiling.

Starts a fresh daemon (and a bare asyncio msgpack server as the ceiling) in a temp
folder, drives them from forked client processes that use `runnerd_client`, prints
tables, and cleans up. Not a test: it asserts nothing, it reports.

    /tmp/venv/bin/python bench/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack

from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import (
    HEADER,
    Create,
    Fail,
    Heartbeat,
    Request,
    Start,
    Status,
    Succeed,
    frame,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
FORK = mp.get_context("fork")
FAILURE_CLASSES = ("ValueError", "RuntimeError", "CUDAOutOfMemoryError", "KeyError")


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    seconds: float
    registry_runs: int
    status_reps: int
    client_counts: tuple[int, ...] = (1, 8, 32)
    windows: tuple[int, ...] = (1, 16)
    lifecycle_procs: int = 8
    lifecycle_window: int = 64
    fill_procs: int = 4
    fill_window: int = 64
    repeat: int = 1


FULL = Plan(seconds=5.0, registry_runs=100_000, status_reps=10)
QUICK = Plan(seconds=1.0, registry_runs=10_000, status_reps=5)


# --- the bare ceiling server --------------------------------------------------


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


async def _bare_main(path: str) -> None:
    server = await asyncio.start_unix_server(_bare_connection, path)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def serve_bare(path: str) -> None:
    """Entry point of the ceiling server process (`--serve-bare PATH`)."""
    asyncio.run(_bare_main(path))


# --- server processes ---------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Server:
    """A server subprocess listening on a unix socket."""

    name: str
    argv: list[str]
    socket: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Server:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._accepting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def _accepting(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def wait_idle(self, timeout: float = 300.0, probe: float = 0.5) -> float:
        """After a burst of acks the daemon may still be writing metadata.json files."""
        return wait_idle(self.pid, timeout, probe)

    def stop(self, timeout: float = 120.0) -> None:
        stop_process(self.proc, self.name, timeout)


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


def stop_process(proc: subprocess.Popen[bytes] | None, name: str, timeout: float = 120.0) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"{name} ignored SIGTERM for {timeout} s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait()


def runnerd_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RUNNERD_SOCKET=str(root / "rd.sock"), RUNNERD_DB=str(root / "state" / "reg.db"),
               XDG_DATA_HOME=str(root / "data"), XDG_CONFIG_HOME=str(root / "config"),
               XDG_STATE_HOME=str(root / "state"), XDG_RUNTIME_DIR=str(root))
    env.pop("RUNNERD_RUN_ID", None)
    return env


def make_runnerd(root: Path, profile: str | None) -> Server:
    env = runnerd_env(root)
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    argv = [sys.executable, *prefix, "-m", "runnerd", "--socket", env["RUNNERD_SOCKET"],
            "--db", env["RUNNERD_DB"], "--log-level", "warning"]
    return Server("runnerd", argv, Path(env["RUNNERD_SOCKET"]), env, root / "runnerd.log")


def make_bare(root: Path) -> Server:
    path = root / "bare.sock"
    argv = [sys.executable, os.path.abspath(__file__), "--serve-bare", str(path)]
    return Server("bare", argv, path, dict(os.environ), root / "bare.log")


# --- client side: a window of requests in flight ------------------------------


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


# --- client jobs (run in forked processes) ------------------------------------


@dataclass(frozen=True)
class Job:
    """What one client process does; `kind` selects the function in JOBS."""

    kind: str
    socket: str
    window: int = 1
    seconds: float = 0.0
    count: int = 0


def _create(run_id: str, experiment: str, variation: str, seed: int) -> Create:
    return Create(key=new_key(), run_id=run_id, experiment=experiment, variation=variation,
                  params={"lr": 0.01, "seed": seed})


def _lifecycle(run_id: str, variation: str, k: int) -> list[Request]:
    return [_create(run_id, "bench-lifecycle", variation, k),
            Start(key=new_key(), run_id=run_id),
            Succeed(key=new_key(), run_id=run_id)]


def _mixed_lifecycle(run_id: str, variation: str, k: int) -> list[Request]:
    """80% succeeded, 15% failed_crash, 5% left running."""
    reqs: list[Request] = [_create(run_id, "bench-fill", variation, k),
                           Start(key=new_key(), run_id=run_id)]
    if k % 20 == 0:
        return reqs
    if k % 20 <= 3:
        cls = FAILURE_CLASSES[k % len(FAILURE_CLASSES)]
        return [*reqs, Fail(key=new_key(), run_id=run_id, reason="crash", failure_class=cls,
                            message=f"bad value {k} at step {k * 7}")]
    return [*reqs, Succeed(key=new_key(), run_id=run_id)]


def _timed(pipe: Pipeline, barrier: Any, seconds: float,
           step: Callable[[int], None]) -> tuple[float, float]:
    """Call `step(k)` until `seconds` after the barrier; return (start, end) of sending."""
    barrier.wait(timeout=120)
    start = time.monotonic()
    stop, k = start + seconds, 0
    while time.monotonic() < stop:
        k += 1
        step(k)
    end = time.monotonic()
    pipe.drain()
    return start, end


def job_heartbeat(job: Job, index: int, barrier: Any, conn: Connection) -> dict[str, Any]:
    run_id = new_run_id()
    conn.call(_create(run_id, "bench-heartbeat", f"c{index}", index))
    conn.call(Start(key=new_key(), run_id=run_id))
    pipe = Pipeline(conn, job.window)
    start, end = _timed(pipe, barrier, job.seconds,
                        lambda k: pipe.submit([Heartbeat(run_id=run_id, seq=k)]))
    conn.call(Succeed(key=new_key(), run_id=run_id))
    return _result(pipe, start, end)


def job_lifecycle(job: Job, index: int, barrier: Any, conn: Connection) -> dict[str, Any]:
    """window 1: wait for each reply; window > 1: whole lifecycles back to back."""
    pipe = Pipeline(conn, job.window)

    def step(k: int) -> None:
        reqs = _lifecycle(new_run_id(), f"p{index}", k)
        if job.window > 1:
            pipe.submit(reqs)
            return
        for req in reqs:
            pipe.submit([req], record=isinstance(req, Succeed))

    start, end = _timed(pipe, barrier, job.seconds, step)
    return _result(pipe, start, end)


def job_fill(job: Job, index: int, barrier: Any, conn: Connection) -> dict[str, Any]:
    pipe = Pipeline(conn, job.window)
    start = time.monotonic()
    for k in range(job.count):
        pipe.submit(_mixed_lifecycle(new_run_id(), f"f{index}-{k % 50}", k))
    pipe.drain()
    return _result(pipe, start, time.monotonic())


def _result(pipe: Pipeline, start: float, end: float) -> dict[str, Any]:
    return {"start": start, "end": end, "done": pipe.done.tobytes(),
            "latency": pipe.latency.tobytes(), "errors": len(pipe.errors),
            "error_sample": pipe.errors[:3]}


JobFn = Callable[[Job, int, Any, Connection], dict[str, Any]]
JOBS: dict[str, JobFn] = {"heartbeat": job_heartbeat, "lifecycle": job_lifecycle,
                          "fill": job_fill}


def _worker(job: Job, index: int, barrier: Any, queue: Any, release: Any) -> None:
    """Process body: one Connection, one job, one result on the queue.

    The process then lives on until `release` is set, so runs it left running stay
    attached to a live process (the daemon fails a run whose processes are gone).
    """
    try:
        conn = Connection(job.socket, client="bench_core")
        try:
            result = JOBS[job.kind](job, index, barrier, conn)
        finally:
            conn.close()
    except BaseException as exc:  # report anything, so the parent never waits forever
        with contextlib.suppress(Exception):
            barrier.abort()
        result = {"failed": f"client {index}: {exc!r}"}
    queue.put(result)
    release.wait(3600)


@contextlib.contextmanager
def clients(job: Job, procs: int, timeout: float = 600.0) -> Iterator[list[dict[str, Any]]]:
    """Run `job` in `procs` forked client processes; yield their results while they live."""
    barrier, queue, release = FORK.Barrier(procs), FORK.Queue(), FORK.Event()
    workers = [FORK.Process(target=_worker, args=(job, i, barrier, queue, release), daemon=True)
               for i in range(procs)]
    for w in workers:
        w.start()
    try:
        results = [queue.get(timeout=timeout) for _ in workers]
        failed = [r["failed"] for r in results if "failed" in r]
        if failed:
            raise RuntimeError("; ".join(failed[:3]))
        yield results
    finally:
        release.set()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.terminate()
                w.join()


def run_clients(job: Job, procs: int) -> list[dict[str, Any]]:
    """Run `job` in `procs` client processes and return once they are gone."""
    with clients(job, procs) as results:
        return results


# --- figures ------------------------------------------------------------------


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


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


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
    latencies.sort()
    seconds = max(hi - lo, 1e-9)
    return Figures(count / seconds, count, seconds, sum(r["errors"] for r in results),
                   _percentile(latencies, 0.50) * 1e3, _percentile(latencies, 0.99) * 1e3,
                   error_sample=[e for r in results for e in r["error_sample"]][:3])


def measure_once(server: Server, job: Job, procs: int) -> Figures:
    """Run a timed job against a server; also charge the server's CPU to each ack."""
    cpu0 = server.cpu()
    figures = summarize(run_clients(job, procs))
    figures.cpu_per_ack_us = (server.cpu() - cpu0) / max(figures.count, 1) * 1e6
    if figures.errors:
        print(f"    {figures.errors} error replies, e.g. {figures.error_sample}", file=sys.stderr)
    return figures


def measure(server: Server, job: Job, procs: int, repeat: int) -> Figures:
    """The best of `repeat` runs: interference from other load only ever slows a run down."""
    print(f"  {job.kind:<9} {server.name:<7} clients={procs:<3} window={job.window}",
          file=sys.stderr, flush=True)
    return max((measure_once(server, job, procs) for _ in range(repeat)), key=lambda f: f.rate)


# --- stages -------------------------------------------------------------------


@dataclass
class Report:
    """Everything the stages measured, printed at the end."""

    heartbeats: list[tuple[int, int, Figures, Figures]] = field(default_factory=list)
    lifecycles: list[tuple[int, str, Figures]] = field(default_factory=list)
    registry: dict[str, Any] = field(default_factory=dict)
    commands: list[tuple[str, list[float]]] = field(default_factory=list)
    load_before: float = 0.0
    wall_seconds: float = 0.0
    foreign_cpu: float = 0.0


def stage_heartbeats(plan: Plan, runnerd: Server, bare: Server, report: Report) -> None:
    """Same clients, same code, against runnerd then the bare server, interleaved."""
    print("heartbeats", file=sys.stderr)
    for procs in plan.client_counts:
        for window in plan.windows:
            job = Job("heartbeat", "", window, plan.seconds)
            figs = [measure(server, replace(job, socket=str(server.socket)), procs, plan.repeat)
                    for server in (runnerd, bare)]
            report.heartbeats.append((procs, window, figs[0], figs[1]))
            runnerd.wait_idle()


def stage_lifecycles(plan: Plan, runnerd: Server, report: Report) -> None:
    """create+start+succeed, waiting for each reply or with whole lifecycles in flight."""
    print("lifecycles", file=sys.stderr)
    sock = str(runnerd.socket)
    for procs in (1, plan.lifecycle_procs):
        for window, mode in ((1, "sequential"), (plan.lifecycle_window, "pipelined")):
            figs = measure(runnerd, Job("lifecycle", sock, window, plan.seconds), procs,
                           plan.repeat)
            figs.drain_seconds = runnerd.wait_idle()
            report.lifecycles.append((procs, f"{mode} (window {window})", figs))


def registry_counts(sock: Path) -> dict[str, int]:
    conn = Connection(sock, client="bench_core")
    try:
        counts: dict[str, int] = conn.call(Status())["counts"]
    finally:
        conn.close()
    return counts


def stage_registry(plan: Plan, runnerd: Server, report: Report) -> None:
    """Top the registry up to `plan.registry_runs` runs, then time the CLI against it.

    The fill clients stay alive while the CLI is timed, so the runs they left
    running stay running (a run whose processes are all gone is failed by the daemon).
    """
    missing = plan.registry_runs - sum(registry_counts(runnerd.socket).values())
    print(f"filling the registry with {max(missing, 0)} runs", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as holders:
        began = time.monotonic()
        if missing > 0:
            per = -(-missing // plan.fill_procs)
            job = Job("fill", str(runnerd.socket), plan.fill_window, count=per)
            results = holders.enter_context(clients(job, plan.fill_procs))
            report.registry["fill_errors"] = sum(r["errors"] for r in results)
            report.registry["filled"] = per * plan.fill_procs
        report.registry["fill_seconds"] = time.monotonic() - began
        report.registry["backlog_seconds"] = runnerd.wait_idle()
        report.registry["counts"] = registry_counts(runnerd.socket)
        stage_status(plan, runnerd, report)


def time_command(argv: list[str], env: dict[str, str], reps: int) -> list[float]:
    """Wall time of a command, after one untimed warm-up run."""
    subprocess.run(argv, env=env, capture_output=True, check=True)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - began)
    return times


def time_status_request(sock: Path, reps: int) -> list[float]:
    """The Status round trip on an open connection: the daemon's share of `status`."""
    conn = Connection(sock, client="bench_core")
    try:
        conn.call(Status())
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            conn.call(Status())
            times.append(time.perf_counter() - began)
    finally:
        conn.close()
    return times


def runnerctl_argv() -> list[str]:
    script = Path(sys.executable).parent / "runnerctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runnerd.cli"]


def stage_status(plan: Plan, runnerd: Server, report: Report) -> None:
    """Wall time of the CLI, beside its floors: interpreter start-up and the daemon's reply."""
    print("runnerctl timings", file=sys.stderr, flush=True)
    ctl, env, reps = runnerctl_argv(), runnerd.env, plan.status_reps
    for label, args in (("runnerctl status", ["status"]),
                        ("runnerctl status --json", ["status", "--json"]),
                        ("runnerctl list", ["list"])):
        report.commands.append((label, time_command([*ctl, *args], env, reps)))
    report.commands.append(("  floor: python -c 'import runnerd.cli'",
                            time_command([sys.executable, "-c", "import runnerd.cli"], env, reps)))
    report.commands.append(("  daemon: Status request, open connection",
                            time_status_request(runnerd.socket, reps)))


# --- output -------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_heartbeats(report: Report) -> None:
    print("\nAcknowledged heartbeats/s (window = requests in flight per client; "
          "latency from window-1 runs; cpu = server CPU per ack)")
    print(f"{'clients':>7} {'window':>6} {'runnerd/s':>10} {'bare/s':>9} {'ratio':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'bare p50':>8} {'bare p99':>8} "
          f"{'cpu us rd':>9} {'cpu us bare':>11} {'errors':>6}")
    for procs, window, rd, bare in report.heartbeats:
        lat = (f"{rd.p50_ms:7.2f} {rd.p99_ms:7.2f} {bare.p50_ms:8.2f} {bare.p99_ms:8.2f}"
               if window == 1 else f"{'-':>7} {'-':>7} {'-':>8} {'-':>8}")
        print(f"{procs:>7} {window:>6} {rd.rate:>10.0f} {bare.rate:>9.0f} "
              f"{rd.rate / bare.rate:>6.0%} {lat} {rd.cpu_per_ack_us:>9.0f} "
              f"{bare.cpu_per_ack_us:>11.0f} {rd.errors + bare.errors:>6}")
    top = [(rd, bare) for c, w, rd, bare in report.heartbeats if w == 1]
    if top:
        rd, bare = top[-1]
        ratio = rd.rate / bare.rate
        print(f"target: window-1 heartbeats with the most clients >= 60% of bare: "
              f"{ratio:.0%} {_verdict(ratio >= 0.6)}")


def print_lifecycles(report: Report) -> None:
    print("\nLifecycles/s (create+start+succeed, each acknowledged)")
    print(f"{'procs':>5}  {'mode':<22} {'lifecycles/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'cpu us':>7} {'drain s':>7} {'errors':>6}")
    for procs, mode, f in report.lifecycles:
        print(f"{procs:>5}  {mode:<22} {f.rate:>12.0f} {f.p50_ms:>7.2f} {f.p99_ms:>7.2f} "
              f"{f.cpu_per_ack_us:>7.0f} {f.drain_seconds:>7.1f} {f.errors:>6}")
    one = max((f.rate for p, _, f in report.lifecycles if p == 1), default=0.0)
    print(f"target: >= 2000 lifecycles/s from one process: {one:.0f} {_verdict(one >= 2000)}")
    print("(p50/p99: from sending the lifecycle's last request, or its whole group when "
          "pipelined, to the reply; cpu us: daemon CPU per lifecycle, measured up to the last "
          "ack; drain s: how long the daemon stayed busy after it, writing metadata.json)")


def print_status(report: Report) -> None:
    reg = report.registry
    counts = reg.get("counts", {})
    print(f"\nRegistry: {sum(counts.values())} runs "
          f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    if "filled" in reg:
        print(f"filled {reg['filled']} runs in {reg['fill_seconds']:.1f} s "
              f"({reg['filled'] / reg['fill_seconds']:.0f} lifecycles/s, "
              f"{reg['fill_errors']} errors); daemon still busy {reg['backlog_seconds']:.1f} s "
              "after the last ack (metadata.json backlog)")
    print(f"{'command':<44} {'median ms':>9} {'max ms':>7}")
    for label, times in report.commands:
        print(f"{label:<44} {statistics.median(times) * 1e3:>9.1f} {max(times) * 1e3:>7.1f}")
    status = next((t for label, t in report.commands if label == "runnerctl status"), None)
    if status:
        median = statistics.median(status) * 1e3
        print(f"target: runnerctl status < 150 ms: median {median:.0f} ms "
              f"{_verdict(median < 150)}")


# --- main -----------------------------------------------------------------------


@contextlib.contextmanager
def temp_root() -> Iterator[Path]:
    """A short temp path (unix socket paths are limited to 107 bytes), always removed."""
    root = Path(tempfile.mkdtemp(prefix="rdb-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def machine_busy() -> float:
    """CPU-seconds every CPU has spent busy since boot (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu() -> float:
    """CPU-seconds of this process and its reaped children (servers, clients, runnerctl)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(plan: Plan, profile: str | None) -> Report:
    """All stages on one fresh daemon and one bare server; both stopped whatever happens."""
    report = Report(load_before=os.getloadavg()[0])
    busy0, own0, began = machine_busy(), own_cpu(), time.monotonic()
    with temp_root() as root:
        runnerd, bare = make_runnerd(root, profile), make_bare(root)
        try:
            runnerd.start()
            bare.start()
            stage_heartbeats(plan, runnerd, bare, report)
            stage_lifecycles(plan, runnerd, report)
            stage_registry(plan, runnerd, report)
        finally:
            bare.stop()
            runnerd.stop()
    report.wall_seconds = time.monotonic() - began
    report.foreign_cpu = (machine_busy() - busy0) - (own_cpu() - own0)
    return report


def print_header(report: Report, mode: str) -> None:
    cpus = os.cpu_count() or 1
    foreign = report.foreign_cpu / (report.wall_seconds * cpus)
    print(f"runnerd core benchmark, {mode} mode: {report.wall_seconds:.0f} s on {cpus} CPUs; "
          f"load average {report.load_before:.1f} before")
    print(f"other processes used {report.foreign_cpu:.0f} CPU-s meanwhile "
          f"({foreign:.0%} of the machine)"
          + ("  <- figures are noisy" if foreign > 0.05 else ""))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 s per workload and 10,000 runs in the registry (< 60 s)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each timed workload N times and keep the best (default 1)")
    parser.add_argument("--profile-daemon", metavar="FILE",
                        help="run runnerd under cProfile (event-loop thread only), stats to FILE")
    parser.add_argument("--serve-bare", metavar="PATH", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = replace(QUICK if args.quick else FULL, repeat=max(1, args.repeat))
    report = run(plan, args.profile_daemon)
    print_header(report, "quick" if args.quick else "full")
    print_heartbeats(report)
    print_lifecycles(report)
    print_status(report)


if __name__ == "__main__":
    main()
