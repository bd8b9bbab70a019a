"""Resource-sampling figures for runnerd: the sampler's CPU with many attached processes,
and the time from an OOM kill to the run's `failed_crash` with category `oom`.

Starts one daemon in a temp folder. Forks small client
processes that each create and start a run (so each is an attached pid) and then sleep,
and measures the daemon's CPU with 0 and N of them, sampling every 5 s (the default) and
every 1 s (config.toml). Times the sampler's steps in this process against the same pids.
Then runs `runnerctl exec --memory 100M` on a command that allocates until the kernel kills
it, and times the kill until `get` shows `failed_crash`/`oom`. Prints tables, cleans up.
Not a test: it asserts nothing, it reports.

    python bench/bench_resources.py [--quick]
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import (
    FORK,
    RUNNERCTL,
    Idle,
    Quiet,
    Runnerd,
    arguments,
    epoch,
    machine_busy,
    pct,
    sample_idle,
    session,
    temp_root,
    verdict,
)

from runnerd import usage
from runnerd_client import procinfo
from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Create, Get, ListRuns, Start

EXPERIMENT = "bench-resources"
PR_SET_PDEATHSIG = 1
HOG = (
    "import time\nheld = []\nwhile True:\n    held.append(b'x' * (1 << 20))\n"
    "    time.sleep(0.003)\n"
)


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    procs: int
    window: float  # seconds of each timed window with N attached processes
    baseline: float  # seconds of each window with none
    ooms: int
    fast_window: float = 0.0  # window at sample_interval = 1 (defaults to `window`)
    spawners: int = 2
    batch: int = 25
    memory: str = "100M"


FULL = Plan(procs=1000, window=30.0, baseline=30.0, ooms=10)
QUICK = Plan(procs=200, window=10.0, baseline=5.0, ooms=3, fast_window=5.0)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (and exit now if it already has)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


# --- attached client processes ----------------------------------------------------


def _client(sock: str, index: int, out: int, parent: int) -> None:
    """Forked client: create and start a run (so this pid is attached), report, sleep."""
    code = 0
    try:
        die_with_parent(parent)
        conn = Connection(sock, timeout=120, client="bench_resources")
        try:
            run_id = new_run_id()
            conn.call(
                Create(key=new_key(), run_id=run_id, experiment=EXPERIMENT, variation=f"c{index}"),
                timeout=120,
            )
            conn.call(Start(key=new_key(), run_id=run_id, heartbeat_timeout=3600.0), timeout=120)
        finally:
            conn.close()
        os.write(out, f"{os.getpid()} {run_id}\n".encode())
        while True:
            signal.pause()
    except BaseException as exc:
        os.write(out, f"{os.getpid()} error:{exc!r}"[:400].replace("\n", " ").encode() + b"\n")
        code = 1
    finally:
        os._exit(code)


def _read_lines(fd: int, want: int, timeout: float) -> list[str]:
    """`want` newline-terminated lines from a pipe, or fewer if `timeout` passes."""
    buf, deadline = b"", time.monotonic() + timeout
    while buf.count(b"\n") < want:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        buf += os.read(fd, 1 << 16)
    return buf.decode().splitlines()


def _spawner(
    sock: str, first: int, count: int, batch: int, results: Any, release: Any, parent: int
) -> None:
    """Fork `count` clients, `batch` at a time; report them; kill and reap them on release."""
    die_with_parent(parent)
    me = os.getpid()
    read_end, write_end = os.pipe()
    children: list[int] = []
    lines: list[str] = []
    try:
        for start in range(0, count, batch):
            size = min(batch, count - start)
            for i in range(size):
                pid = os.fork()
                if pid == 0:
                    os.close(read_end)
                    _client(sock, first + start + i, write_end, me)
                children.append(pid)
            got = _read_lines(read_end, size, 120.0)
            lines += got
            if len(got) < size:
                lines.append(f"0 error:{size - len(got)} clients did not answer in 120 s")
                break
        results.put(lines)
        release.wait(7200)
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)


@contextlib.contextmanager
def clients(sock: Path, plan: Plan) -> Iterator[dict[str, int]]:
    """`plan.procs` sleeping client processes, each attached to a running run of its own:
    yields run_id -> pid; kills them all on leaving."""
    results, release = FORK.Queue(), FORK.Event()
    per = -(-plan.procs // plan.spawners)
    counts = [min(per, plan.procs - i * per) for i in range(plan.spawners)]
    procs = [
        FORK.Process(
            target=_spawner,
            args=(str(sock), i * per, n, plan.batch, results, release, os.getpid()),
            daemon=True,
        )
        for i, n in enumerate(counts)
        if n > 0
    ]
    for p in procs:
        p.start()
    try:
        attached: dict[str, int] = {}
        errors: list[str] = []
        for _ in procs:
            for line in results.get(timeout=900):
                pid, what = line.split(" ", 1)
                if what.startswith("error:"):
                    errors.append(what)
                else:
                    attached[what] = int(pid)
        if errors:
            raise RuntimeError(f"{len(errors)} clients failed: {'; '.join(errors[:3])}")
        yield attached
    finally:
        release.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()


# --- stage 1: the sampler's CPU ---------------------------------------------------


@dataclass
class Window:
    """One timed window: the daemon's CPU with `attached` processes at `interval`."""

    interval: float
    attached: int
    idle: Idle
    seconds: float
    others_pct: float  # CPU other processes used meanwhile, % of the whole machine
    threads_gone: bool  # a daemon thread exited: its schedstat and switches left the sums

    @property
    def ms_per_round(self) -> float:
        return self.idle.cpu_pct / 100 * self.interval * 1e3


@dataclass
class Steps:
    """The sampler's steps timed in this process, over the same pids (median CPU ms)."""

    procs_in_proc: int
    process_table: float
    descendants: float
    first_round: float
    later_round: float


def _median_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Median CPU time of `fn` in this thread (other load does not inflate it), in ms."""
    times = []
    for _ in range(reps):
        began = time.thread_time()
        fn()
        times.append(time.thread_time() - began)
    return statistics.median(times) * 1e3


def time_steps(attached: dict[str, int]) -> Steps:
    """What one sampling round costs, step by step (runnerd.usage, single-threaded): a
    group per run, each sampled with a fresh cgroup cache (a first round) or a warm one."""
    table = procinfo.process_table()
    children = procinfo.children_of(table)
    groups = [usage.Group(frozenset({pid})) for pid in attached.values()]
    warm = usage.Cgroups()

    def descendants() -> None:
        found = procinfo.children_of(table)
        for group in groups:
            procinfo.with_descendants(group.roots, table, found)

    def sample(cgroups: Callable[[], usage.Cgroups]) -> Callable[[], None]:
        def round_() -> None:
            cache, now = cgroups(), time.time()
            for group in groups:
                group.sample(table, children, cache, now)

        return round_

    sample(lambda: warm)()
    sample(lambda: warm)()  # a process seen for the first time is read twice
    return Steps(
        len(table),
        _median_ms(procinfo.process_table),
        _median_ms(descendants),
        _median_ms(sample(usage.Cgroups)),
        _median_ms(sample(lambda: warm)),
    )


def running_runs(daemon: Runnerd) -> list[dict[str, Any]]:
    with daemon.connect() as conn:
        runs: list[dict[str, Any]] = conn.call(
            ListRuns(state="running", limit=10_000), timeout=120
        )["runs"]
        return runs


def wait_sampled(daemon: Runnerd, want: int, timeout: float = 120.0) -> None:
    """Until `want` runs are running and every one of them has a resource sample."""
    deadline = time.monotonic() + timeout
    while True:
        runs = running_runs(daemon)
        sampled = sum(1 for r in runs if r.get("resources"))
        if len(runs) == want and sampled == want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(runs)} running, {sampled} sampled; wanted {want}")
        time.sleep(0.5)


def wait_none_running(daemon: Runnerd, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while daemon.counts().get("running", 0):
        if time.monotonic() > deadline:
            raise RuntimeError("runs still running after their processes were killed")
        time.sleep(0.2)


def window(daemon: Runnerd, quiet: Quiet, interval: float, attached: int, seconds: float) -> Window:
    """Let the daemon settle, wait for other load to go, then time it for `seconds`."""
    daemon.wait_idle(timeout=20.0)
    quiet.wait()
    print(
        f"timing {seconds:g} s: {attached} attached, sample_interval {interval:g}",
        file=sys.stderr,
        flush=True,
    )
    busy0, mine0, daemon0, t0 = machine_busy(), _self_cpu(), daemon.cpu(), time.monotonic()
    tasks = _tasks(daemon.pid)
    idle = sample_idle(daemon.pid, seconds, attached)
    others = (machine_busy() - busy0) - (_self_cpu() - mine0) - (daemon.cpu() - daemon0)
    share = max(0.0, others) / ((time.monotonic() - t0) * (os.cpu_count() or 1)) * 100
    return Window(interval, attached, idle, seconds, share, bool(tasks - _tasks(daemon.pid)))


def _tasks(pid: int) -> set[str]:
    return set(os.listdir(f"/proc/{pid}/task"))


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def set_interval(daemon: Runnerd, interval: float) -> None:
    """Write `sample_interval` into the daemon's config.toml (read when it starts)."""
    daemon.config.parent.mkdir(parents=True, exist_ok=True)
    daemon.config.write_text(f"sample_interval = {interval:g}\n")


@dataclass
class Sampling:
    windows: list[Window] = field(default_factory=list)
    steps: Steps | None = None
    spawn_seconds: float = 0.0
    restart_seconds: float = 0.0


def stage_sampling(daemon: Runnerd, plan: Plan, quiet: Quiet) -> Sampling:
    """0 and N attached at the default interval; restart at 1 s; N and 0 again."""
    out = Sampling()
    fast = plan.fast_window or plan.window
    out.windows.append(window(daemon, quiet, 5.0, 0, plan.baseline))
    print(f"starting {plan.procs} attached clients", file=sys.stderr, flush=True)
    began = time.monotonic()
    with clients(daemon.socket, plan) as attached:
        out.spawn_seconds = time.monotonic() - began
        wait_sampled(daemon, plan.procs)
        out.windows.append(window(daemon, quiet, 5.0, len(attached), plan.window))
        out.steps = time_steps(attached)
        daemon.stop()
        set_interval(daemon, 1.0)
        out.restart_seconds = daemon.timed_start()
        time.sleep(1.5)  # the restarted daemon re-watches every pid; let it sample once
        wait_sampled(daemon, plan.procs)
        out.windows.append(window(daemon, quiet, 1.0, len(attached), fast))
    wait_none_running(daemon)
    out.windows.append(window(daemon, quiet, 1.0, 0, plan.baseline))
    return out


# --- stage 2: OOM kill to failed_crash/oom -----------------------------------------


@dataclass
class Oom:
    """One OOM kill: seconds from the command's death to each thing that follows."""

    rc: int
    to_seen: float  # `get` shows failed_crash
    to_exit: float  # runnerctl exec exits
    to_at: float  # the failure's own `at` (runnerctl's clock, ms resolution)
    failure_class: str
    category: str | None
    message: str


def child_of(pid: int) -> int | None:
    """The first child of `pid`, from /proc/PID/task/PID/children."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(text[0]) if text else None


def is_dead(pid: int) -> bool:
    """Gone or a zombie: the kernel has killed it (its parent may not have reaped it yet)."""
    return procinfo.read_proc(pid) is None


def run_id_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e[len(b"RUNNERD_RUN_ID=") :] for e in env if e.startswith(b"RUNNERD_RUN_ID=")]
    return found[0].decode() if found else None


def one_oom(daemon: Runnerd, conn: Connection, memory: str, poll: float = 0.0005) -> Oom | str:
    """Launch one hog under `runnerctl exec --memory`; the figures, or why there are none."""
    proc = subprocess.Popen(
        [
            *RUNNERCTL,
            "exec",
            "--experiment",
            "bench-oom",
            "--memory",
            memory,
            "--",
            sys.executable,
            "-c",
            HOG,
        ],
        env=daemon.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        command = run_id = None
        while proc.poll() is None and (command is None or run_id is None):
            command = command or child_of(proc.pid)
            run_id = run_id_of(command) if command else None
            time.sleep(poll)
        if command is None or run_id is None:
            _, err = proc.communicate(timeout=60)
            return f"exit {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"
        while not is_dead(command):
            time.sleep(poll)
        dead, dead_wall = time.perf_counter(), time.time()
        seen = exited = None
        while seen is None or exited is None:
            now = time.perf_counter()
            if exited is None and proc.poll() is not None:
                exited = now
            if seen is None:
                run = conn.call(Get(run=run_id))["run"]
                if run["state"] == "failed_crash":
                    seen = now
            if now - dead > 60:
                return f"run {run_id} not failed_crash 60 s after the kill"
            time.sleep(poll)
        proc.communicate(timeout=60)
        failure = run["failure"] or {}
        return Oom(
            proc.returncode,
            seen - dead,
            exited - dead,
            epoch(failure["at"]) - dead_wall if failure.get("at") else float("nan"),
            str(failure.get("failure_class")),
            failure.get("category"),
            str(failure.get("message")),
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@dataclass
class Ooms:
    kills: list[Oom] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def stage_oom(daemon: Runnerd, plan: Plan, quiet: Quiet) -> Ooms:
    """`plan.ooms` OOM kills, one at a time; stops at the first launch that cannot run."""
    out = Ooms()
    print(f"OOM kills: {plan.ooms} x exec --memory {plan.memory}", file=sys.stderr, flush=True)
    with daemon.connect() as conn:
        for _ in range(plan.ooms):
            quiet.wait()
            got = one_oom(daemon, conn, plan.memory)
            if isinstance(got, str):
                out.problems.append(got)
                break
            out.kills.append(got)
    return out


# --- output -----------------------------------------------------------------------


def print_sampling(s: Sampling, plan: Plan) -> None:
    print(
        f"\nThe daemon's CPU while sampling (% of one core; {plan.procs} client processes "
        f"started in {s.spawn_seconds:.1f} s, each attached to a run of its own)"
    )
    print(
        f"{'sample_interval':>15} {'attached':>8} {'window s':>8} {'CPU %':>6} "
        f"{'schedstat %':>11} {'ms/round':>8} {'wakeups/s':>9} {'RSS MB':>7} "
        f"{'others %':>8}"
    )
    for w in s.windows:
        precise, wakeups = (
            (f"{'n/a':>11}", f"{'n/a':>9}")
            if w.threads_gone
            else (f"{w.idle.precise_pct:>11.3f}", f"{w.idle.wakeups:>9.1f}")
        )
        print(
            f"{w.interval:>15g} {w.attached:>8} {w.seconds:>8g} {w.idle.cpu_pct:>6.2f} "
            f"{precise} {w.ms_per_round:>8.1f} {wakeups} {w.idle.rss_mb:>7.1f} "
            f"{w.others_pct:>8.1f}"
        )
    print(
        f"(CPU % = utime+stime / wall; schedstat %: the same in ns, n/a when a daemon "
        f"thread exited in the window;\n ms/round = CPU-ms per sampling round; others % = "
        f"CPU the rest of the machine used in the window;\n restart with {plan.procs} live "
        f"runs answered `status` in {s.restart_seconds:.2f} s)"
    )
    if s.steps is not None:
        st = s.steps
        print(
            f"\nOne round's steps run in this process ({plan.procs} runs of 1 pid, "
            f"{st.procs_in_proc} processes in /proc; median CPU ms of 5)"
        )
        for label, ms in (
            ("process_table (read every /proc/PID/stat)", st.process_table),
            ("children_of, then with_descendants of every run", st.descendants),
            ("Group.sample of every run, cgroups read (a first round)", st.first_round),
            ("Group.sample of every run, cgroups cached", st.later_round),
        ):
            print(f"  {label:<56} {ms:8.1f}")
    default = next((w for w in s.windows if w.interval == 5.0 and w.attached), None)
    if default is not None:
        print(
            f"target: < 2% of a core sampling {default.attached} processes every 5 s: "
            f"{default.idle.cpu_pct:.2f}% {verdict(default.idle.cpu_pct < 2.0)}"
        )


def print_ooms(o: Ooms, plan: Plan) -> None:
    print(
        f"\nOOM kill under `runnerctl exec --memory {plan.memory}` (a command allocating "
        f"1 MiB every 3 ms), {len(o.kills)} kills, one at a time"
    )
    for problem in o.problems:
        print(f"  could not measure: {problem}")
    if not o.kills:
        return
    print(f"{'from the kill (command seen dead in /proc) to':<48} {'p50 ms':>7} {'max ms':>7}")
    for label, values in (
        ("`get` showing failed_crash (polled every 0.5 ms)", [k.to_seen for k in o.kills]),
        ("runnerctl exec exiting", [k.to_exit for k in o.kills]),
        ("the failure's `at` (wall clock, ms)", [k.to_at for k in o.kills]),
    ):
        print(f"{label:<48} {pct(values, 0.5) * 1e3:>7.1f} {max(values) * 1e3:>7.1f}")
    rcs = sorted({k.rc for k in o.kills})
    kinds = sorted({f"{k.failure_class}/{k.category}" for k in o.kills})
    print(f"exit codes: {rcs}; failures: {', '.join(kinds)}")
    print(f"last message: {o.kills[-1].message}")


# --- main -------------------------------------------------------------------------


def main() -> None:
    parser = arguments(__doc__, "200 processes, shorter windows, 3 OOM kills (< 60 s)")
    parser.add_argument("--procs", type=int, help="override the number of attached processes")
    parser.add_argument("--ooms", type=int, help="override the number of OOM kills")
    args = parser.parse_args()
    bench = session(args)
    plan = QUICK if args.quick else FULL
    if args.procs:
        plan = replace(plan, procs=args.procs)
    if args.ooms is not None:
        plan = replace(plan, ooms=args.ooms)
    with temp_root() as root:
        daemon = Runnerd(root)
        try:
            bench.quiet.wait()
            daemon.start(60.0)
            ooms = stage_oom(daemon, plan, bench.quiet)
            sampling = stage_sampling(daemon, plan, bench.quiet)
        finally:
            daemon.stop()
    bench.stop()
    bench.header("resources", "quick" if args.quick else "full")
    print_sampling(sampling, plan)
    print_ooms(ooms, plan)


if __name__ == "__main__":
    main()
