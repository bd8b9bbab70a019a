"""Core figures for runnerd: heartbeats, lifecycles, `runnerctl status` at scale, and a ceiling.

Starts a fresh daemon (and a bare asyncio msgpack server as the ceiling) in a temp
folder, drives them from forked client processes that use `runnerd_client`, prints
tables, and cleans up. Not a test: it asserts nothing, it reports.

    python bench/bench_core.py [--quick]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from harness import (
    RUNNERCTL,
    Bare,
    Figures,
    Runnerd,
    Session,
    arguments,
    create,
    fillers,
    heartbeats,
    lifecycles,
    measure,
    median_row,
    session,
    temp_root,
    time_command,
    time_floor,
    time_request,
    verdict,
)

from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Fail, Request, Start, Status, Succeed

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


@dataclass
class Report:
    """Everything the stages measured, printed at the end."""

    heartbeats: list[tuple[int, int, Figures, Figures]] = field(default_factory=list)
    lifecycles: list[tuple[int, str, Figures]] = field(default_factory=list)
    registry: dict[str, Any] = field(default_factory=dict)
    commands: list[tuple[str, list[float]]] = field(default_factory=list)


def stage_heartbeats(plan: Plan, runnerd: Runnerd, bare: Bare, report: Report) -> None:
    """Same clients, same code, against runnerd then the bare server, interleaved."""
    print("heartbeats", file=sys.stderr)
    for procs in plan.client_counts:
        for window in plan.windows:
            figs = [
                measure(
                    server,
                    f"heartbeat {name:<7} window={window}",
                    heartbeats(server.socket, window, plan.seconds),
                    procs,
                    plan.repeat,
                )
                for name, server in (("runnerd", runnerd), ("bare", bare))
            ]
            report.heartbeats.append((procs, window, figs[0], figs[1]))
            runnerd.wait_idle()


def stage_lifecycles(plan: Plan, runnerd: Runnerd, report: Report) -> None:
    """create+start+succeed, waiting for each reply or with whole lifecycles in flight."""
    print("lifecycles", file=sys.stderr)
    for procs in (1, plan.lifecycle_procs):
        for window, mode in ((1, "sequential"), (plan.lifecycle_window, "pipelined")):
            figs = measure(
                runnerd,
                f"lifecycle window={window}",
                lifecycles(runnerd.socket, window, plan.seconds),
                procs,
                plan.repeat,
            )
            figs.drain_seconds = runnerd.wait_idle()
            report.lifecycles.append((procs, f"{mode} (window {window})", figs))


def mixed_lifecycle(index: int, k: int) -> list[Request]:
    """80% succeeded, 15% failed_crash, 5% left running."""
    run_id = new_run_id()
    reqs: list[Request] = [
        create(run_id, "bench-fill", f"f{index}-{k % 50}", k),
        Start(key=new_key(), run_id=run_id),
    ]
    if k % 20 == 0:
        return reqs
    if k % 20 <= 3:
        cls = FAILURE_CLASSES[k % len(FAILURE_CLASSES)]
        return [
            *reqs,
            Fail(
                key=new_key(),
                run_id=run_id,
                reason="crash",
                failure_class=cls,
                message=f"bad value {k} at step {k * 7}",
            ),
        ]
    return [*reqs, Succeed(key=new_key(), run_id=run_id)]


def stage_registry(plan: Plan, runnerd: Runnerd, report: Report) -> None:
    """Top the registry up to `plan.registry_runs` runs, then time the CLI against it.

    The fill clients stay alive while the CLI is timed, so the runs they left
    running stay running (a run whose processes are all gone is failed by the daemon).
    """
    missing = max(plan.registry_runs - sum(runnerd.counts().values()), 0)
    print(f"filling the registry with {missing} runs", file=sys.stderr, flush=True)
    reg = report.registry
    with contextlib.ExitStack() as holders:
        if missing:
            reg["fill_seconds"], reg["fill_errors"], _ = holders.enter_context(
                fillers(runnerd.socket, missing, plan.fill_procs, plan.fill_window, mixed_lifecycle)
            )
            reg["filled"] = -(-missing // plan.fill_procs) * plan.fill_procs
        reg["backlog_seconds"] = runnerd.wait_idle()
        reg["counts"] = runnerd.counts()
        stage_status(plan, runnerd, report)


def stage_status(plan: Plan, runnerd: Runnerd, report: Report) -> None:
    """Wall time of the CLI, beside its floors: interpreter start-up and the daemon's reply."""
    print("runnerctl timings", file=sys.stderr, flush=True)
    for label, args in (
        ("runnerctl status", ["status"]),
        ("runnerctl status --json", ["status", "--json"]),
        ("runnerctl list", ["list"]),
    ):
        report.commands.append(
            (label, time_command([*RUNNERCTL, *args], runnerd.env, plan.status_reps))
        )
    report.commands.append(time_floor(plan.status_reps))
    report.commands.append(
        (
            "  daemon: Status request, open connection",
            time_request(runnerd.socket, Status(), plan.status_reps),
        )
    )


def print_heartbeats(report: Report) -> None:
    print(
        "\nAcknowledged heartbeats/s (window = requests in flight per client; "
        "latency from window-1 runs; cpu = server CPU per ack)"
    )
    print(
        f"{'clients':>7} {'window':>6} {'runnerd/s':>10} {'bare/s':>9} {'ratio':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'bare p50':>8} {'bare p99':>8} "
        f"{'cpu us rd':>9} {'cpu us bare':>11} {'errors':>6}"
    )
    for procs, window, rd, bare in report.heartbeats:
        lat = (
            f"{rd.p50_ms:7.2f} {rd.p99_ms:7.2f} {bare.p50_ms:8.2f} {bare.p99_ms:8.2f}"
            if window == 1
            else f"{'-':>7} {'-':>7} {'-':>8} {'-':>8}"
        )
        print(
            f"{procs:>7} {window:>6} {rd.rate:>10.0f} {bare.rate:>9.0f} "
            f"{rd.rate / bare.rate:>6.0%} {lat} {rd.cpu_per_ack_us:>9.0f} "
            f"{bare.cpu_per_ack_us:>11.0f} {rd.errors + bare.errors:>6}"
        )
    top = [(rd, bare) for c, w, rd, bare in report.heartbeats if w == 1]
    if top:
        rd, bare = top[-1]
        ratio = rd.rate / bare.rate
        print(
            f"target: window-1 heartbeats with the most clients >= 60% of bare: "
            f"{ratio:.0%} {verdict(ratio >= 0.6)}"
        )


def print_lifecycles(report: Report) -> None:
    print("\nLifecycles/s (create+start+succeed, each acknowledged)")
    print(
        f"{'procs':>5}  {'mode':<22} {'lifecycles/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'cpu us':>7} {'drain s':>7} {'errors':>6}"
    )
    for procs, mode, f in report.lifecycles:
        print(
            f"{procs:>5}  {mode:<22} {f.rate:>12.0f} {f.p50_ms:>7.2f} {f.p99_ms:>7.2f} "
            f"{f.cpu_per_ack_us:>7.0f} {f.drain_seconds:>7.1f} {f.errors:>6}"
        )
    one = max((f.rate for p, _, f in report.lifecycles if p == 1), default=0.0)
    print(f"target: >= 2000 lifecycles/s from one process: {one:.0f} {verdict(one >= 2000)}")
    print(
        "(p50/p99: from sending the lifecycle's last request, or its whole group when "
        "pipelined, to the reply; cpu us: daemon CPU per lifecycle, measured up to the last "
        "ack; drain s: how long the daemon stayed busy after it, writing metadata.json)"
    )


def print_status(report: Report) -> None:
    reg = report.registry
    counts = reg.get("counts", {})
    print(
        f"\nRegistry: {sum(counts.values())} runs "
        f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})"
    )
    if reg.get("filled"):
        print(
            f"filled {reg['filled']} runs in {reg['fill_seconds']:.1f} s "
            f"({reg['filled'] / reg['fill_seconds']:.0f} lifecycles/s, "
            f"{reg['fill_errors']} errors); daemon still busy {reg['backlog_seconds']:.1f} s "
            "after the last ack (metadata.json backlog)"
        )
    print(f"{'command':<44} {'median ms':>9} {'max ms':>7}")
    for label, times in report.commands:
        print(median_row(label, times, 44))
    status = next((t for label, t in report.commands if label == "runnerctl status"), None)
    if status:
        median = statistics.median(status) * 1e3
        print(f"target: runnerctl status < 150 ms: median {median:.0f} ms {verdict(median < 150)}")


def run(plan: Plan, profile: str | None, bench: Session) -> Report:
    """All stages on one fresh daemon and one bare server; both stopped whatever happens."""
    report = Report()
    with temp_root() as root:
        runnerd, bare = Runnerd(root / "rd", profile=profile), Bare(root / "bare")
        try:
            runnerd.start(20.0)
            bare.start(20.0)
            stage_heartbeats(plan, runnerd, bare, report)
            stage_lifecycles(plan, runnerd, report)
            stage_registry(plan, runnerd, report)
        finally:
            bare.stop()
            runnerd.stop()
    bench.stop()
    return report


def main() -> None:
    parser = arguments(__doc__, "1 s per workload and 10,000 runs in the registry (< 60 s)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each timed workload N times and keep the best (default 1)",
    )
    parser.add_argument(
        "--profile-daemon",
        metavar="FILE",
        help="run runnerd under cProfile (event-loop thread only), stats to FILE",
    )
    args = parser.parse_args()
    bench = session(args)
    plan = replace(QUICK if args.quick else FULL, repeat=max(1, args.repeat))
    report = run(plan, args.profile_daemon, bench)
    bench.header("core", "quick" if args.quick else "full")
    print_heartbeats(report)
    print_lifecycles(report)
    print_status(report)


if __name__ == "__main__":
    main()
