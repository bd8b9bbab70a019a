"""How long a SIGKILLed MLflow run or Optuna trial stays RUNNING in the tool's own store,
and the daemon's CPU per hook delivery.

Starts a fresh daemon in a temp folder whose config.toml has the shipped MLflow and Optuna
hooks (`--mode stream`, the default: one process per hook, the tool imported and its store
opened when the daemon starts; `--mode call`: a process per event), then, `--kills` times
for each tool: a script (an MLflow run under the RUNNERD_MLFLOW=1 opt-in; an Optuna trial
through `tracked`) starts and waits; it is SIGKILLed, and the tool's sqlite store is polled
every 5 ms until it shows FAILED. Prints p50/p99/max of kill -> runnerd's failed_crash
(from the run's `ended_at`) and kill -> the tool's FAILED.

Then the cost: `--runs` runs created, started and failed by one client, in an experiment
both hooks want (each run one delivery to each) and, in alternate rounds, in one they do
not; the daemon's own CPU (utime + stime, not its children's) from /proc, from the
workload's start until both hooks have nothing left. The difference per delivery is the
daemon's CPU per hook delivery. Not a test: it reports.

    python bench/bench_integrations.py [--quick] [--kills N] [--batch N] [--mode M]
        [--runs N] [--rounds R]
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime

from harness import Runnerd, arguments, pct, session, temp_root

from runnerd_client.connection import Connection
from runnerd_client.protocol import HookList

MLFLOW_SCRIPT = """
    import os
    import mlflow
    run = mlflow.start_run()
    print(run.info.run_id, os.getpid(), flush=True)
    os.read(0, 1)  # until the bench kills it
"""

OPTUNA_SCRIPT = """
    import os, sys
    import optuna
    from runnerd_client.optuna import tracked
    url, name = sys.argv[1:]

    def objective(trial):
        print(trial.number, os.getpid(), flush=True)
        os.read(0, 1)  # until the bench kills it
        return 0.0

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, load_if_exists=True)
    study.optimize(tracked(objective, storage=url), n_trials=1)
"""


FAIL_RUNS = """
import sys
import runnerd_client as rd
client = rd.connect()
for n in range(int(sys.argv[2])):
    client.run(sys.argv[1], variation=f"v{n}").start().fail(message="bench")
"""


def hooks_config(daemon: Runnerd, mode: str) -> str:
    """Both shipped hooks, for the bench's experiments (`b-*`), each told its store: MLflow
    through MLFLOW_TRACKING_URI, Optuna through --storage (a stream opens them at once)."""
    hook = [sys.executable, "-m", "runnerd_client.{}", "hook"]
    commands = {
        "mlflow": ["env", f"MLFLOW_TRACKING_URI={mlflow_uri(daemon)}", *hook],
        "optuna": [*hook, "--storage", optuna_url(daemon)],
    }
    return "".join(
        f"""
[[hooks]]
name = "{tool}"
events = ["failed_*", "lost"]
experiment = "b-*"
mode = "{mode}"
command = {json.dumps([arg.format(tool) for arg in command])}
"""
        for tool, command in commands.items()
    )


def mlflow_uri(daemon: Runnerd) -> str:
    return f"sqlite:///{daemon.root}/mlflow.db"


def optuna_url(daemon: Runnerd) -> str:
    return f"sqlite:///{daemon.root}/optuna.db"


def make_stores(daemon: Runnerd) -> None:
    """Both tools' tables, made before the scripts and the hooks (which open the stores as
    the daemon starts) race to make them."""
    import optuna
    from mlflow.client import MlflowClient

    MlflowClient(mlflow_uri(daemon)).search_experiments()
    optuna.storages.RDBStorage(optuna_url(daemon))


def start(daemon: Runnerd, code: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    script = daemon.root / f"bench_{abs(hash(code))}.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env={**daemon.env, **env},
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # read only if it fails to start
    )


def ready(proc: subprocess.Popen[str]) -> tuple[str, int]:
    """What the script printed once its run or trial started: an id and its pid."""
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"a bench script did not start: {proc.stderr.read()[-2000:]}")
    ident, pid = line.split()
    return ident, int(pid)


def poll(done: Callable[[], bool], timeout: float = 60.0) -> float:
    """Poll until `done()`; the time it became true (nan at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return time.time()
        time.sleep(0.005)
    return float("nan")


def runnerd_ended(daemon: Runnerd, experiment: str) -> float:
    """When the daemon ended the killed script's run, the only one of `experiment` (a
    dead process's pid is no longer listed with its run)."""
    for _ in range(100):
        listed = daemon.runnerctl("list", "--experiment", experiment, "--json")
        if listed.returncode != 0:
            sys.exit(f"runnerctl list failed: {listed.stderr}")
        ended = [run["ended_at"] for run in json.loads(listed.stdout) if run["ended_at"]]
        if ended:
            return datetime.fromisoformat(ended[0]).timestamp()
        time.sleep(0.05)
    return float("nan")


def kill_mlflow(daemon: Runnerd, kills: int, batch: int) -> list[tuple[float, float]]:
    from mlflow.client import MlflowClient

    uri = mlflow_uri(daemon)
    client, figures = MlflowClient(uri), []
    while len(figures) < kills:
        names = [f"b-ml-{len(figures) + i}" for i in range(min(batch, kills - len(figures)))]
        procs = [
            (
                name,
                start(
                    daemon,
                    MLFLOW_SCRIPT,
                    env={
                        "MLFLOW_TRACKING_URI": uri,
                        "RUNNERD_MLFLOW": "1",
                        "RUNNERD_EXPERIMENT": name,
                    },
                ),
            )
            for name in names
        ]
        for name, proc in procs:
            mlflow_id, pid = ready(proc)
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            failed = poll(lambda m=mlflow_id: client.get_run(m).info.status == "FAILED")
            figures.append((runnerd_ended(daemon, name) - killed, failed - killed))
            proc.wait()
    return figures


def kill_optuna(daemon: Runnerd, kills: int, batch: int) -> list[tuple[float, float]]:
    import optuna

    url = optuna_url(daemon)
    storage, figures = optuna.storages.RDBStorage(url), []
    while len(figures) < kills:
        names = [f"b-opt-{len(figures) + i}" for i in range(min(batch, kills - len(figures)))]
        procs = [(name, start(daemon, OPTUNA_SCRIPT, url, name, env={})) for name in names]
        for name, proc in procs:
            number, pid = ready(proc)
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(name), int(number)
            )
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            failed = poll(lambda t=trial_id: storage.get_trial(t).state.name == "FAIL")
            figures.append((runnerd_ended(daemon, name) - killed, failed - killed))
            proc.wait()
    return figures


def delivered(conn: Connection) -> int | None:
    """Deliveries so far, once no hook has a backlog (None while one has)."""
    hooks = conn.call(HookList())["hooks"]
    return None if any(h["backlog"] for h in hooks) else sum(h["delivered"] for h in hooks)


def wait_delivered(conn: Connection, daemon: Runnerd, at_least: int = 0) -> int:
    deadline = time.monotonic() + 600
    while (count := delivered(conn)) is None or count < at_least:
        if time.monotonic() > deadline:
            sys.exit(f"the hooks did not deliver (log: {daemon.log_tail(2000)})")
        time.sleep(0.05)
    return count


def failing_runs(daemon: Runnerd, experiment: str, runs: int, wanted: bool) -> tuple[float, int]:
    """The daemon's CPU seconds while `runs` runs of `experiment` fail and the hooks deliver
    what they want of it (two deliveries a run if `wanted`), and how many they made."""
    with closing(Connection(daemon.socket)) as conn:
        before, cpu = wait_delivered(conn, daemon), daemon.cpu()
        subprocess.run(
            [sys.executable, "-c", FAIL_RUNS, experiment, str(runs)], env=daemon.env, check=True
        )
        after = wait_delivered(conn, daemon, before + (2 * runs if wanted else 0))
        return daemon.cpu() - cpu, after - before


def delivery_cost(daemon: Runnerd, runs: int, rounds: int) -> tuple[float, int]:
    """Median over `rounds` of (CPU with deliveries - CPU without) per delivery."""
    costs, deliveries = [], 0
    for n in range(rounds):
        hooked, count = failing_runs(daemon, f"b-cost-{n}", runs, wanted=True)
        unhooked, _ = failing_runs(daemon, f"x-cost-{n}", runs, wanted=False)
        costs.append((hooked - unhooked) / count)
        deliveries += count
    return statistics.median(costs), deliveries


def report(tool: str, figures: list[tuple[float, float]]) -> None:
    for what, values in (
        ("runnerd failed_crash", [f[0] for f in figures]),
        (f"{tool} FAILED", [f[1] for f in figures]),
    ):
        print(
            f"{tool:7} kill -> {what:22} p50 {statistics.median(values) * 1000:7.0f} ms"
            f"   p99 {pct(values, 0.99) * 1000:7.0f} ms"
            f"   max {max(values) * 1000:7.0f} ms   (n={len(values)})"
        )


def main() -> None:
    parser = arguments(__doc__, "5 kills per tool")
    parser.add_argument("--kills", type=int, help="kills per tool (default 20)")
    parser.add_argument("--mode", choices=("stream", "call"), default="stream")
    parser.add_argument("--runs", type=int, help="failed runs per cost round (default 200)")
    parser.add_argument("--rounds", type=int, help="cost rounds (default 3)")
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="scripts started together before they are killed one by one",
    )
    args = parser.parse_args()
    bench = session(args)
    kills = args.kills or (5 if args.quick else 20)
    runs, rounds = args.runs or (50 if args.quick else 200), args.rounds or (1 if args.quick else 3)
    with temp_root() as root:
        daemon = Runnerd(root)
        daemon.config.parent.mkdir(parents=True)
        daemon.config.write_text(hooks_config(daemon, args.mode))
        make_stores(daemon)
        daemon.start(20.0)
        try:
            bench.quiet.wait()
            figures = {"optuna": kill_optuna(daemon, kills, args.batch)}
            bench.quiet.wait()
            figures["mlflow"] = kill_mlflow(daemon, kills, args.batch)
            bench.quiet.wait()
            cost, deliveries = delivery_cost(daemon, runs, rounds)
        finally:
            daemon.stop()
    bench.stop()
    bench.header("integrations", "quick" if args.quick else "full")
    print(f"hooks in {args.mode} mode")
    for tool, found in figures.items():
        report(tool, found)
    print(
        f"daemon CPU per hook delivery: {cost * 1e3:.2f} ms "
        f"(median of {rounds} rounds, {deliveries} deliveries to the two hooks)"
    )


if __name__ == "__main__":
    main()
