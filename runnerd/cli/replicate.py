"""`runnerctl sweep replicate`: run a sweep's cells again and check each ends as recorded.

A replication is a record of its own (SPEC §8). Its attempts are linked to their cells
(`sweep_id`, `cell`, tag `replication`) without claiming them, so the sweep's outcomes,
attempts and manifest stay as `run` and `resume` left them, and every replication is
compared with the same record. Its report, a verdict per cell, is kept beside the
manifest as `replication-<id>.json`. An ending is the state, the failure class (the
exception the command raised, as runnerctl exec records it) and the signature.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runnerd.cli import sweep_driver as driver
from runnerd.times import iso
from runnerd_client.client import Client
from runnerd_client.ids import new_run_id
from runnerd_client.protocol import SweepPolicy
from runnerd_client.sweep_engine import Listener
from runnerd_client.sweep_model import CellOutcome, PlannedCell, SweepOptions
from runnerd_client.trust import write_atomically

REPLICATED = ("succeeded", "failed")  # recorded outcomes a replication can compare with


@dataclass(frozen=True)
class Ending:
    """How one attempt of a cell ended, as replicate compares it."""

    state: str
    failure_class: str | None = None
    signature: str | None = None
    run_id: str | None = None

    @classmethod
    def of(cls, state: str, failure: dict[str, Any] | None, run_id: str | None) -> Ending:
        failure = failure or {}
        return cls(state, failure.get("failure_class"), failure.get("signature"), run_id)

    def same(self, other: Ending) -> bool:
        return (self.state, self.failure_class, self.signature) == (
            other.state,
            other.failure_class,
            other.signature,
        )

    def text(self) -> str:
        return (
            self.state
            if self.failure_class is None
            else f"{self.state} {self.failure_class} [{self.signature}]"
        )


@dataclass(frozen=True)
class Verdict:
    """One cell: its recorded ending, the replication's, and whether they are the same."""

    index: int
    variation: str
    recorded: Ending
    now: Ending

    @property
    def same(self) -> bool:
        return self.recorded.same(self.now)


@dataclass
class Replication:
    """A replication of some cells of a sweep, and where its report is kept."""

    replication_id: str
    sweep_id: str
    started_at: float
    verdicts: list[Verdict]
    interrupted: bool
    report: Path | None = None

    @property
    def differ(self) -> int:
        return sum(not v.same for v in self.verdicts)


def recorded_cells(cells: Iterable[dict[str, Any]], failed_only: bool) -> dict[int, Any]:
    """The cells with a recorded outcome to replicate (only the failed ones if asked)."""
    wanted = ("failed",) if failed_only else REPLICATED
    return {c["index"]: c for c in cells if c["state"] in wanted}


def replicate(
    socket: Path | None,
    sweep: dict[str, Any],
    recorded: dict[int, dict[str, Any]],
    jobs: int | None,
    listener: Listener,
) -> Replication:
    """Run the recorded cells again under continue_on_failure, compare, keep the report.
    Raises driver.NotRecorded if the daemon stayed away."""
    replication_id, started = new_run_id(), time.time()
    options = SweepOptions.of(
        sweep, jobs=jobs, policy=SweepPolicy.CONTINUE_ON_FAILURE, replication=replication_id
    )
    client = Client(socket)
    planned = [PlannedCell.recorded(c, after_latest=False) for _, c in sorted(recorded.items())]
    turn = driver.run_turn(client, sweep, options, planned, listener)
    if not client.drain(driver.END_PATIENCE):
        raise driver.NotRecorded(f"runnerd was unreachable for {driver.END_PATIENCE:g} s")
    replication = Replication(
        replication_id,
        sweep["sweep_id"],
        started,
        [
            _verdict(recorded[o.index], _now(client, o))
            for o in sorted(turn.outcomes, key=lambda o: o.index)
        ],
        turn.interrupted is not None,
    )
    replication.report = _keep(sweep, replication)
    return replication


def _now(client: Client, outcome: CellOutcome) -> Ending:
    """The replication's ending, its failure fetched if it ended while the daemon was away."""
    failure = outcome.failure
    if failure is None and outcome.state != "succeeded" and outcome.run_id is not None:
        failure = (driver.fetch_run(client, outcome.run_id) or {}).get("failure")
    return Ending.of(outcome.state, failure, outcome.run_id)


def _verdict(cell: dict[str, Any], now: Ending) -> Verdict:
    return Verdict(
        cell["index"],
        cell["variation"],
        Ending.of(cell["state"], cell["failure"], cell["run_id"]),
        now,
    )


def _keep(sweep: dict[str, Any], replication: Replication) -> Path:
    """Write the report beside the sweep's manifest; its path (OSError if it cannot)."""
    name = f"replication-{replication.replication_id}.json"
    doc = {
        "replication_id": replication.replication_id,
        "sweep_id": replication.sweep_id,
        "experiment": sweep["experiment"],
        "started_at": iso(replication.started_at),
        "ended_at": iso(time.time()),
        "interrupted": replication.interrupted,
        "same": len(replication.verdicts) - replication.differ,
        "differ": replication.differ,
        "cells": [{**asdict(v), "same": v.same} for v in replication.verdicts],
    }
    write_atomically(sweep["folder"], name, (json.dumps(doc, indent=1) + "\n").encode())
    return Path(sweep["folder"]) / name
