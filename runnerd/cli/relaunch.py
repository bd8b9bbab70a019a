"""`runnerctl resume --interrupted`: relaunch the launched runs a crash cut short, each as
its next attempt resumed from its last checkpoint, in the environment it ran with, all at
once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runnerd.cli.attempts import Attempt, Launch, run_with_retries
from runnerd.cli.launcher import Launcher, forwarding
from runnerd_client.client import Client
from runnerd_client.protocol import Get, RunnerdError
from runnerd_client.retries import Retries


@dataclass(frozen=True)
class Interrupted:
    """The interrupted runs, by what `resume --interrupted` does with them: relaunch those
    runnerctl launched, resume the sweeps of sweep cells, only name the others."""

    launched: list[dict[str, Any]]
    sweeps: list[str]
    others: list[dict[str, Any]]

    @classmethod
    def of(cls, runs: list[dict[str, Any]]) -> Interrupted:
        return cls(
            [r for r in runs if not r["sweep_id"] and r["launch"]],
            sorted({r["sweep_id"] for r in runs if r["sweep_id"]}),
            [r for r in runs if not r["sweep_id"] and not r["launch"]],
        )

    def plan(self) -> dict[str, list[str]]:
        """What would be done, as `--dry-run --json` shows it."""
        return {
            "runs": [r["run_id"] for r in self.launched],
            "sweeps": self.sweeps,
            "not_launched": [r["run_id"] for r in self.others],
        }


def relaunch(
    socket: Path | None, runs: list[dict[str, Any]], say: Callable[[str], None]
) -> list[int]:
    """Relaunch each run; the exit status of each (1 for one not relaunched)."""
    client, launcher = Client(socket), Launcher()
    codes: list[int] = []

    def one(run: dict[str, Any]) -> None:
        recorded = client.ask(Get(run=run["run_id"], env=True), timeout=30.0) or {}
        launch = replace(Launch.from_run(run, recorded.get("env")), resume=True)
        try:
            outcome = run_with_retries(
                client, launch, Retries(), Attempt(launcher, echo=False, retry_of=run["run_id"])
            )
        except RunnerdError as exc:
            say(f"{run['run_id']}: not relaunched: {exc}")
            codes.append(1)
            return
        state = "succeeded" if outcome.succeeded else "failed"
        say(f"{run['run_id']} -> {outcome.run.run_id}: {state}")
        codes.append(outcome.exit_code)

    threads = [threading.Thread(target=one, args=(run,)) for run in runs]
    with forwarding(launcher):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return codes
