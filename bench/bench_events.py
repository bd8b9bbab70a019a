"""Live-event figures for runnerd: what subscribers cost the daemon, and how late events arrive.

Starts one fresh daemon in a temp folder, forks subscriber processes
that each hold a `Connection` with `Subscribe()` (no filter) and drain `next_event`, and
measures with 0, 10 and 100 of them: acknowledged heartbeats/s (32 clients, window 1, no
events), pipelined lifecycles/s (3 events each), and the delay from a transition's ack to
its event reaching each subscriber. Prints tables and cleans up. Not a test: it reports.

    python bench/bench_events.py [--quick]
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness import (
    FORK,
    Body,
    Figures,
    Quiet,
    Runnerd,
    Session,
    arguments,
    cpu_seconds,
    heartbeats,
    lifecycles,
    measure,
    pct,
    session,
    temp_root,
    verdict,
)

from runnerd_client.connection import Connection
from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Create, Request, Start, Subscribe, Succeed

PROBE = "bench-events-probe"
LATENCY = "bench-latency"
Stamps = dict[tuple[str, str], tuple[float, float]]  # (run_id, to) -> (sent, acked), time.time()
COUNTERS = 3  # per subscriber: events received, events dropped (per `lagged`), lagged notices


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    seconds: float
    transitions: int
    rate: float = 200.0
    throughput_subs: tuple[int, ...] = (0, 10, 100)
    latency_subs: tuple[int, ...] = (1, 10, 100)
    heartbeat_clients: int = 32
    lifecycle_procs: int = 8
    lifecycle_window: int = 64
    repeat: int = 1


FULL = Plan(seconds=5.0, transitions=2_000)
QUICK = Plan(seconds=1.5, transitions=600)


# --- subscriber processes ---------------------------------------------------------


def _subscriber(sock: str, index: int, counters: Any, ready: Any, stop: Any, results: Any) -> None:
    """Process body: subscribe to everything, count events, timestamp the latency runs."""
    samples: list[tuple[str, str, float]] = []
    try:
        conn = Connection(sock, client="bench_events")
        conn.call(Subscribe())
        ready.put(("subscribed", index))
        live, base = False, index * COUNTERS
        received = dropped = lagged = 0
        while True:
            event = conn.next_event(timeout=0.2)
            if event is None:
                if stop.is_set():
                    break
                continue
            now = time.time()
            kind = event["event"]
            if kind == "lagged":
                dropped += event["dropped"]
                lagged += 1
                counters[base + 1], counters[base + 2] = dropped, lagged
                continue
            received += 1
            counters[base] = received
            experiment = event.get("experiment")
            if experiment == LATENCY:
                samples.append((event["run_id"], event.get("to") or "", now))
            elif experiment == PROBE and not live:
                live = True
                ready.put(("live", index))
        conn.close()
        results.put((index, samples, None))
    except BaseException as exc:  # report anything, so the parent never waits forever
        with contextlib.suppress(Exception):
            ready.put(("failed", index))
        results.put((index, [], f"subscriber {index}: {exc!r}"))


@dataclass
class Subscribers:
    """A group of subscriber processes and the counters they keep."""

    procs: list[Any]
    counters: Any
    results: Any
    stop: Any
    samples: list[list[tuple[str, str, float]]] = field(default_factory=list)

    def totals(self) -> tuple[int, int, int]:
        """(events received, events dropped, lagged notices) summed over subscribers."""
        c = list(self.counters)
        return (sum(c[0::COUNTERS]), sum(c[1::COUNTERS]), sum(c[2::COUNTERS]))

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def settle(self, timeout: float = 30.0, probe: float = 0.3) -> tuple[int, int, int]:
        """Wait until the counters stop moving (subscribers caught up); return them."""
        last, deadline = self.totals(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(probe)
            now = self.totals()
            if now == last:
                break
            last = now
        return last


def _probe(sock: str) -> None:
    conn = Connection(sock, client="bench_events")
    try:
        conn.call(
            Create(
                key=new_key(), run_id=new_run_id(), experiment=PROBE, variation="probe", params={}
            )
        )
    finally:
        conn.close()


@contextlib.contextmanager
def subscribers(sock: str, n: int, timeout: float = 120.0) -> Iterator[Subscribers]:
    """Fork `n` subscribers; yield once every one receives live events; stop them after."""
    ctx = FORK
    counters = ctx.RawArray(ctypes.c_longlong, max(n, 1) * COUNTERS)
    ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_subscriber, args=(sock, i, counters, ready, stop, results), daemon=True)
        for i in range(n)
    ]
    for p in procs:
        p.start()
    group = Subscribers(procs, counters, results, stop)
    try:
        _wait_ready(sock, ready, n, timeout)
        yield group
    finally:
        stop.set()
        errors = []
        for _ in procs:
            with contextlib.suppress(Exception):
                _index, samples, error = results.get(timeout=30)
                group.samples.append(samples)
                if error:
                    errors.append(error)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join()
        if errors:
            print(f"    {len(errors)} subscribers failed, e.g. {errors[0]}", file=sys.stderr)


def _wait_ready(sock: str, ready: Any, n: int, timeout: float) -> None:
    """Every subscriber is subscribed, then probe runs until each has seen one live."""
    deadline = time.monotonic() + timeout
    states: dict[str, set[int]] = {"subscribed": set(), "live": set(), "failed": set()}

    def collect(until: float) -> None:
        while time.monotonic() < until:
            try:
                kind, index = ready.get(timeout=max(0.01, until - time.monotonic()))
            except queue.Empty:
                return
            states[kind].add(index)
            if states["failed"]:
                raise RuntimeError(f"subscriber {min(states['failed'])} failed to start")

    while len(states["subscribed"]) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(states['subscribed'])} of {n} subscribers started")
        collect(time.monotonic() + 0.5)
    while len(states["live"]) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(states['live'])} of {n} subscribers went live")
        _probe(sock)
        collect(time.monotonic() + 0.5)


# --- stage 1: throughput with subscribers ------------------------------------------


@dataclass
class Throughput:
    """One workload with `subs` subscribers: the figures, and what the subscribers saw."""

    workload: str
    subs: int
    figures: Figures
    received: int = 0
    dropped: int = 0
    lagged: int = 0
    sub_cpu: float = 0.0
    wall: float = 0.0
    again: bool = False


def measure_throughput(
    runnerd: Runnerd,
    group: Subscribers | None,
    workload: str,
    body: Body,
    procs: int,
    repeat: int,
    subs: int,
) -> Throughput:
    """The harness's `measure`, plus the subscribers' deliveries and CPU over the same span."""
    before = group.totals() if group else (0, 0, 0)
    cpu0, began = (group.cpu() if group else 0.0), time.monotonic()
    figures = measure(runnerd, f"{workload} subscribers={subs}", body, procs, repeat)
    runnerd.wait_idle()
    after = group.settle() if group else (0, 0, 0)
    cpu = group.cpu() - cpu0 if group else 0.0
    received, dropped, lagged = (a - b for a, b in zip(after, before, strict=True))
    return Throughput(
        workload, subs, figures, received, dropped, lagged, cpu, time.monotonic() - began
    )


def stage_throughput(
    plan: Plan,
    runnerd: Runnerd,
    group: Subscribers | None,
    subs: int,
    report: Report,
    again: bool = False,
) -> None:
    """Heartbeats (no events), then pipelined lifecycles (3 events each)."""
    sock = runnerd.socket
    for workload, body, procs in (
        ("heartbeats", heartbeats(sock, 1, plan.seconds), plan.heartbeat_clients),
        ("lifecycles", lifecycles(sock, plan.lifecycle_window, plan.seconds), plan.lifecycle_procs),
    ):
        report.quiet.wait()
        t = measure_throughput(runnerd, group, workload, body, procs, plan.repeat, subs)
        t.again = again
        report.throughput.append(t)


# --- stage 2: commit-to-subscriber latency -----------------------------------------


@dataclass
class Latency:
    """Delays from the ack (and from the send) of each mutation to each subscriber."""

    subs: int
    transitions: int
    rate: float
    from_ack: list[float]
    from_send: list[float]
    ack_rtt: list[float]
    missing: int


def drive_transitions(sock: str, count: int, rate: float) -> Stamps:
    """create, start, succeed one run after another, each acknowledged, `rate` per second.

    Returns {(run_id, to_state): (time.time() at send, time.time() at ack)}.
    """
    conn = Connection(sock, client="bench_events")
    stamps: Stamps = {}
    interval, next_at = 1.0 / rate, time.monotonic()
    try:
        k = 0
        while len(stamps) < count:
            k += 1
            run_id = new_run_id()
            steps: list[tuple[str, Request]] = [
                (
                    "pending",
                    Create(
                        key=new_key(),
                        run_id=run_id,
                        experiment=LATENCY,
                        variation=f"v{k % 10}",
                        params={"k": k},
                    ),
                ),
                ("running", Start(key=new_key(), run_id=run_id)),
                ("succeeded", Succeed(key=new_key(), run_id=run_id)),
            ]
            for to, req in steps[: count - len(stamps)]:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
                sent = time.time()
                conn.call(req)
                stamps[(run_id, to)] = (sent, time.time())
    finally:
        conn.close()
    return stamps


def stage_latency(
    plan: Plan, runnerd: Runnerd, group: Subscribers, subs: int, report: Report
) -> Stamps:
    """Paced transitions; the subscribers stamp each event with time.time() on receipt."""
    report.quiet.wait()
    print(
        f"  latency   runnerd subscribers={subs} transitions={plan.transitions} "
        f"at {plan.rate:.0f}/s",
        file=sys.stderr,
        flush=True,
    )
    stamps = drive_transitions(str(runnerd.socket), plan.transitions, plan.rate)
    group.settle(timeout=10)
    return stamps


def finish_latency(subs: int, stamps: Stamps, group: Subscribers, rate: float) -> Latency:
    """Match each subscriber's receipts to the mutations (after the group has stopped)."""
    from_ack, from_send, missing = [], [], 0
    for samples in group.samples:
        seen = {(run_id, to): t for run_id, to, t in samples}
        missing += sum(1 for key in stamps if key not in seen)
        for key, t in seen.items():
            if key in stamps:
                sent, acked = stamps[key]
                from_ack.append(t - acked)
                from_send.append(t - sent)
    missing += (subs - len(group.samples)) * len(stamps)
    rtt = sorted(acked - sent for sent, acked in stamps.values())
    return Latency(subs, len(stamps), rate, sorted(from_ack), sorted(from_send), rtt, missing)


# --- output -------------------------------------------------------------------------


@dataclass
class Report:
    """Everything measured, printed at the end."""

    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    quiet: Quiet = field(default_factory=Quiet)


def _ms(sorted_values: Sequence[float], q: float) -> str:
    return f"{pct(sorted_values, q) * 1e3:7.2f}"


def print_throughput(report: Report, plan: Plan) -> None:
    print(
        f"\nThroughput with subscribers (each its own process, Subscribe() with no filter, "
        f"draining next_event); heartbeats: {plan.heartbeat_clients} clients, window 1 (they "
        f"make no events); lifecycles: create+start+succeed, {plan.lifecycle_procs} processes "
        f"x {plan.lifecycle_window} in flight (3 events each)"
    )
    print(
        f"{'workload':<11} {'subs':>4} {'rate/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'cpu us':>7} {'cpu ratio':>9} {'delivered':>9} {'lagged':>6} {'sub us/ev':>9} "
        f"{'sub cpu/s':>9} {'errors':>6}"
    )
    base: dict[str, Throughput] = {}
    for t in report.throughput:
        f = t.figures
        b = base.setdefault(t.workload, t).figures
        offered = t.received + t.dropped
        delivered = f"{t.received / offered:.0%}" if offered else "-"
        per_event = f"{t.sub_cpu / t.received * 1e6:.1f}" if t.sub_cpu >= 0.1 else "-"
        print(
            f"{t.workload:<11} {'0*' if t.again else t.subs:>4} {f.rate:>8.0f} "
            f"{f.rate / b.rate:>6.0%} {f.p50_ms:>7.2f} {f.p99_ms:>7.2f} "
            f"{f.cpu_per_ack_us:>7.0f} {b.cpu_per_ack_us / f.cpu_per_ack_us:>9.0%} "
            f"{delivered:>9} {t.lagged:>6} {per_event:>9} "
            f"{t.sub_cpu / max(t.wall, 1e-9):>9.2f} {f.errors:>6}"
        )
    print(
        "(ratio: rate over the first 0-subscriber rate; 0*: 0 subscribers again at the end, "
        "for drift; cpu us: daemon CPU per ack (per lifecycle); cpu ratio: 0-subscriber cpu us "
        "over this one, the ratio to expect where subscribers do not share the daemon's CPUs; "
        "delivered: events received / (received + dropped for lag); sub us/ev, sub cpu/s: "
        "the subscribers' CPU per event received, and in CPU-s per second of the stage)"
    )
    for workload in ("heartbeats", "lifecycles"):
        most = [t for t in report.throughput if t.workload == workload and not t.again]
        if len(most) > 1 and workload in base:
            t, b = most[-1], base[workload].figures
            ratio, cpu = t.figures.rate / b.rate, b.cpu_per_ack_us / t.figures.cpu_per_ack_us
            print(
                f"target: {workload} with {t.subs} subscribers >= 80% of 0: {ratio:.0%} "
                f"{verdict(ratio >= 0.8)} (daemon CPU per op: {cpu:.0%} "
                f"{verdict(cpu >= 0.8)})"
            )


def print_latency(report: Report) -> None:
    if not report.latency:
        return
    lat = report.latency[0]
    print(
        f"\nLatency to subscribers: {lat.transitions} transitions (create, start, succeed, each "
        f"acknowledged), paced at {lat.rate:.0f}/s; time.time() in both processes (the same "
        "system clock)"
    )
    print(
        f"{'subs':>4} {'samples':>8} {'missing':>7} | from ack: {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} | from send: {'p50 ms':>7} {'p99 ms':>7} | {'ack rtt p50':>11}"
    )
    for s in report.latency:
        print(
            f"{s.subs:>4} {len(s.from_ack):>8} {s.missing:>7} |           "
            f"{_ms(s.from_ack, 0.5)} {_ms(s.from_ack, 0.99)} {_ms(s.from_ack, 1.0)} |"
            f"            {_ms(s.from_send, 0.5)} {_ms(s.from_send, 0.99)} | "
            f"{_ms(s.ack_rtt, 0.5):>11}"
        )
    print(
        "(from ack: receipt minus the writer's ack, which the daemon sends after the commit, "
        "so a lower bound of commit-to-receipt, negative when the event overtakes the ack; "
        "from send: minus the moment the request left, an upper bound)"
    )
    worst = report.latency[-1]
    ack, send = (pct(v, 0.99) * 1e3 for v in (worst.from_ack, worst.from_send))
    print(
        f"target: p99 < 50 ms with {worst.subs} subscribers: from ack {ack:.1f} ms "
        f"{verdict(ack < 50)}, from send (upper bound) {send:.1f} ms "
        f"{verdict(send < 50)}"
    )


# --- main ----------------------------------------------------------------------------


def run(plan: Plan, profile: str | None, bench: Session) -> Report:
    """Every stage on one fresh daemon; the subscriber counts run in ascending order."""
    report = Report(quiet=bench.quiet)
    counts = sorted({*plan.throughput_subs, *plan.latency_subs})
    with temp_root() as root:
        runnerd = Runnerd(root, profile=profile)
        try:
            runnerd.start(20.0)
            sock = str(runnerd.socket)
            for subs in counts:
                print(f"{subs} subscribers", file=sys.stderr, flush=True)
                stamps: Stamps | None = None
                with subscribers(sock, subs) as group:
                    if subs in plan.throughput_subs:
                        stage_throughput(plan, runnerd, group if subs else None, subs, report)
                    if subs in plan.latency_subs:
                        stamps = stage_latency(plan, runnerd, group, subs, report)
                if stamps is not None:  # the subscribers hand their samples over as they stop
                    report.latency.append(finish_latency(subs, stamps, group, plan.rate))
            if 0 in plan.throughput_subs:
                print("0 subscribers again (drift)", file=sys.stderr, flush=True)
                stage_throughput(plan, runnerd, None, 0, report, again=True)
        finally:
            runnerd.stop()
    bench.stop()
    return report


def main() -> None:
    parser = arguments(
        __doc__, f"{QUICK.seconds} s per workload, {QUICK.transitions} transitions (< 60 s)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each timed workload N times and keep the best (default 1)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        metavar="N",
        help=f"transitions/s in the latency stage (default {FULL.rate:.0f})",
    )
    parser.add_argument(
        "--profile-daemon",
        metavar="FILE",
        help="run runnerd under cProfile (event-loop thread only), stats to FILE",
    )
    args = parser.parse_args()
    bench = session(args)
    plan = replace(QUICK if args.quick else FULL, repeat=max(1, args.repeat))
    if args.rate:
        plan = replace(plan, rate=args.rate)
    report = run(plan, args.profile_daemon, bench)
    bench.header("live-events", "quick" if args.quick else "full")
    print_throughput(report, plan)
    print_latency(report)


if __name__ == "__main__":
    main()
