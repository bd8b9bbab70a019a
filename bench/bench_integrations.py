"""How long a SIGKILLed MLflow run or Optuna trial stays RUNNING in the tool's own store.

Starts a fresh daemon in a temp folder whose config.toml has the shipped MLflow and Optuna
hooks, then, `--kills` times for each tool: a script (an MLflow run under the
RUNNERD_MLFLOW=1 opt-in; an Optuna trial through `tracked`) starts and waits; it is
SIGKILLed, and the tool's sqlite store is polled every 5 ms until it shows FAILED. Prints
p50/p99/max of kill -> runnerd's failed_crash (from the run's `ended_at`) and kill -> the
tool's FAILED, which includes the hook's own start (Python, the tool's import, its store).
Not a test: it reports.

    python bench/bench_integrations.py [--quick] [--kills N] [--batch N]
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
from datetime import datetime

from harness import Runnerd, arguments, pct, session, temp_root

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


def hooks_config() -> str:
    return "".join(
        f"""
[[hooks]]
name = "{tool}"
events = ["failed_*", "lost"]
command = {json.dumps([sys.executable, "-m", f"runnerd_client.{tool}", "hook"])}
"""
        for tool in ("mlflow", "optuna")
    )


def start(daemon: Runnerd, code: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    script = daemon.root / f"bench_{abs(hash(code))}.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env={**daemon.env, **env},
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def ready(proc: subprocess.Popen[str]) -> tuple[str, int]:
    """What the script printed once its run or trial started: an id and its pid."""
    assert proc.stdout is not None
    ident, pid = proc.stdout.readline().split()
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

    uri = f"sqlite:///{daemon.root}/mlflow.db"
    client, figures = MlflowClient(uri), []
    client.search_experiments()  # makes the store's tables before scripts race to
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

    url = f"sqlite:///{daemon.root}/optuna.db"
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
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="scripts started together before they are killed one by one",
    )
    args = parser.parse_args()
    bench = session(args)
    kills = args.kills or (5 if args.quick else 20)
    with temp_root() as root:
        daemon = Runnerd(root)
        daemon.config.parent.mkdir(parents=True)
        daemon.config.write_text(hooks_config())
        daemon.start(20.0)
        try:
            bench.quiet.wait()
            figures = {"optuna": kill_optuna(daemon, kills, args.batch)}
            bench.quiet.wait()
            figures["mlflow"] = kill_mlflow(daemon, kills, args.batch)
        finally:
            daemon.stop()
    bench.stop()
    bench.header("integrations", "quick" if args.quick else "full")
    for tool, found in figures.items():
        report(tool, found)


if __name__ == "__main__":
    main()
