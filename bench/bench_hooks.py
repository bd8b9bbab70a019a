"""Daemon CPU per hook delivery.

Runs the same workload (N runs created, started and succeeded by one client: 3 events
each) against a fresh daemon three times over: with no hook, with a hook that wants no
event (the cost of reading and filtering the log), and with a hook that wants every event
(`/bin/true`: the cost of a delivery, not of the command). The daemon's own CPU time
(utime + stime, not its children's) is read from /proc before the workload and once the
hook has nothing left to deliver. Prints a table and the figure. Not a test: it reports.

    nice python bench/bench_hooks.py [--quick] [--runs N] [--rounds R] [--concurrency C]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import CLK_TCK, Runnerd, arguments, session, temp_root

from runnerd_client.connection import Connection
from runnerd_client.protocol import HookList

WORKLOAD = """
import sys
import runnerd_client as rd
client = rd.connect()
for n in range(int(sys.argv[1])):
    client.run("bench-hooks", variation=f"v{n}").start().succeed()
"""
CONFIGS = {
    "no hook": "",
    "hook wanting no event": '[[hooks]]\nname = "none"\nevents = ["failed_lost"]\n'
    'command = ["/bin/true"]\n',
    "hook wanting every event": '[[hooks]]\nname = "all"\nevents = ["*"]\n'
    'command = ["/bin/true"]\n',
}
SETTLE_TIMEOUT = 600.0


@dataclass(frozen=True)
class Round:
    daemon_cpu: float  # seconds
    hook_cpu: float  # seconds, the reaped hook commands'
    delivered: int
    seconds: float  # from the workload's start until nothing is left to deliver


def cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])
    children = int(fields[13]) + int(fields[14])
    return own / CLK_TCK, children / CLK_TCK


def settled(conn: Connection, expected: int | None) -> int | None:
    """Deliveries so far once every hook has nothing left (None while some has)."""
    hooks = conn.call(HookList())["hooks"]
    if any(hook["backlog"] for hook in hooks):
        return None
    delivered = sum(hook["delivered"] for hook in hooks)
    return delivered if expected is None or delivered >= expected else None


def one_round(config: str, runs: int, concurrency: int) -> Round:
    with temp_root() as root:
        daemon = Runnerd(root)
        daemon.config.parent.mkdir(parents=True)
        daemon.config.write_text(f"hook_concurrency = {concurrency}\n{config}")
        daemon.start()
        try:
            conn = Connection(daemon.socket)
            expected = 3 * runs if '"*"' in config else None
            before, started = cpu(daemon.pid), time.monotonic()
            subprocess.run([sys.executable, "-c", WORKLOAD, str(runs)], env=daemon.env, check=True)
            while (delivered := settled(conn, expected)) is None:
                if time.monotonic() - started > SETTLE_TIMEOUT:
                    sys.exit(
                        f"the hooks did not deliver in {SETTLE_TIMEOUT:g} s "
                        f"(log: {daemon.log_tail(2000)})"
                    )
                time.sleep(0.2)
            after, seconds = cpu(daemon.pid), time.monotonic() - started
            conn.close()
        finally:
            daemon.stop()
    return Round(after[0] - before[0], after[1] - before[1], delivered, seconds)


def main() -> None:
    parser = arguments(__doc__, "100 runs, 1 round")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    bench = session(args)
    args.runs = args.runs or (100 if args.quick else 300)
    args.rounds = args.rounds or (1 if args.quick else 3)
    events = 3 * args.runs
    rounds: dict[str, list[Round]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, config in CONFIGS.items():
            bench.quiet.wait()
            rounds[name].append(one_round(config, args.runs, args.concurrency))
    bench.stop()
    bench.header("hooks", "quick" if args.quick else "full")
    print(
        f"{args.runs} runs ({events} events), hook_concurrency {args.concurrency}, "
        f"{args.rounds} rounds (the configurations take turns; medians)"
    )
    print(f"{'daemon':<26}{'daemon CPU s':>13}{'delivered':>11}{'hook CPU s':>12}{'seconds':>9}")
    for name, done in rounds.items():
        print(
            f"{name:<26}{median(done, 'daemon_cpu'):>13.3f}{median(done, 'delivered'):>11.0f}"
            f"{median(done, 'hook_cpu'):>12.3f}{median(done, 'seconds'):>9.2f}"
        )
    base, none, every = rounds.values()
    filtering = statistics.median(
        n.daemon_cpu - b.daemon_cpu for b, n in zip(base, none, strict=True)
    )
    delivery = statistics.median(
        (e.daemon_cpu - b.daemon_cpu) / e.delivered for b, e in zip(base, every, strict=True)
    )
    print(
        f"\nreading and filtering the log: {filtering / events * 1e6:.0f} us of daemon CPU "
        "per event"
    )
    print(
        f"daemon CPU per hook delivery: {delivery * 1e3:.2f} ms (the hook command itself: "
        f"{median(every, 'hook_cpu') / median(every, 'delivered') * 1e3:.2f} ms)"
    )


def median(rounds: list[Round], field: str) -> float:
    return float(statistics.median(getattr(r, field) for r in rounds))


if __name__ == "__main__":
    main()
