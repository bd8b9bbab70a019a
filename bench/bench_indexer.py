"""Crash-indexer and failure-query figures: `runnerctl watch` imports, `failures --group-by`.

Starts fresh daemons in a temp folder, writes foreign run folders, fills the registry with
failed runs from long-lived forked clients, times the CLI, prints tables and cleans up.
Not a test: it asserts nothing, it reports.

    python bench/bench_indexer.py [--quick]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    RUNNERCTL,
    Quiet,
    Runnerd,
    arguments,
    fillers,
    median_row,
    session,
    temp_root,
    time_command,
    time_floor,
    time_request,
    verdict,
)

from runnerd_client.ids import new_key, new_run_id
from runnerd_client.protocol import Create, Fail, Failures, Request, Start

IMPORTED = re.compile(r"(\d+) run\(s\) imported, (\d+) crash file\(s\) indexed, (\d+) already")
FOREIGN_KEY = "tracker"
CLASSES = (
    "ValueError",
    "RuntimeError",
    "KeyError",
    "IndexError",
    "TypeError",
    "OSError",
    "AssertionError",
    "ZeroDivisionError",
    "TimeoutError",
    "MemoryError",
)
TEMPLATES = (
    "batch {n} has shape ({m}, 3) but the model wants (3, {m})",
    "step {n}: loss became nan after {m} updates",
    "worker {n} lost its lease after {m} s",
    "could not read shard {n} of {m}",
    "expected {m} columns, got {n}",
)


@dataclass(frozen=True)
class Plan:
    """How much work each stage does."""

    folders: int
    failures: int
    reps: int
    fill_procs: int = 4
    fill_window: int = 64


FULL = Plan(folders=10_000, failures=100_000, reps=5)
QUICK = Plan(folders=1_000, failures=10_000, reps=3)


# --- stage 1: importing foreign run folders -------------------------------------


def metadata_doc(i: int, now: float) -> dict[str, Any]:
    """A foreign tool's metadata.json: 30% failed, times as epoch numbers or ISO strings."""
    start = now - 86400 + i * 3.0
    runtime = 60.0 + i % 3600
    failed = i % 10 < 3
    reasons = ("CUDA out of memory", "loss is nan", "timeout", "worker killed by SIGKILL")
    doc: dict[str, Any] = {
        "run_id": f"ext-{i:06d}",
        "status": "failed" if failed else "complete",
        "failure_reason": reasons[i % len(reasons)] if failed else None,
        "start_time": start,
        "end_time": start + runtime,
        "runtime_sec": runtime,
        FOREIGN_KEY: "other-tracker/2.1",
    }
    if i % 2:
        doc["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
        doc["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + runtime))
    return doc


def write_folders(base: Path, count: int) -> list[Path]:
    """`count` run folders base/proj-K/run-N/metadata.json; return the metadata paths."""
    now, paths = time.time(), []
    for i in range(count):
        folder = base / f"proj-{i % 20}" / f"run-{i:06d}"
        folder.mkdir(parents=True)
        path = folder / "metadata.json"
        path.write_text(json.dumps(metadata_doc(i, now), indent=2) + "\n")
        paths.append(path)
    return paths


def ctl(daemon: Runnerd, *args: str) -> tuple[float, str]:
    """Run runnerctl against `daemon`; return (wall seconds, stdout)."""
    began = time.perf_counter()
    done = daemon.runnerctl(*args, timeout=1800)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(
            f"runnerctl {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
        )
    return seconds, done.stdout


@dataclass
class Watch:
    """One `runnerctl watch` pass: wall time and what it reported."""

    label: str
    seconds: float
    imported: int = 0
    known: int = 0
    busy_after: float = 0.0


def timed_watch(daemon: Runnerd, folder: Path, label: str, quiet: Quiet) -> Watch:
    quiet.wait()
    seconds, out = ctl(daemon, "watch", str(folder))
    found = IMPORTED.search(out)
    imported, _, known = (int(x) for x in found.groups()) if found else (0, 0, 0)
    return Watch(label, seconds, imported, known, daemon.wait_idle())


def foreign_kept(paths: Sequence[Path], sample: int = 100) -> tuple[int, int]:
    """(how many sampled metadata.json still hold the foreign tool's own key, sample size)."""
    chosen = paths[:: max(1, len(paths) // sample)][:sample]
    kept = sum(1 for p in chosen if FOREIGN_KEY in json.loads(p.read_text()))
    return kept, len(chosen)


@dataclass
class ImportStage:
    folders: int
    write_seconds: float = 0.0
    watches: list[Watch] = field(default_factory=list)
    kept: tuple[int, int] = (0, 0)
    counts: dict[str, int] = field(default_factory=dict)


def stage_import(root: Path, plan: Plan, quiet: Quiet) -> ImportStage:
    """Write foreign folders, watch them (all new), then unwatch and watch again (all known)."""
    print(f"import: {plan.folders} foreign run folders", file=sys.stderr, flush=True)
    stage = ImportStage(plan.folders)
    began = time.monotonic()
    folder = root / "foreign"
    paths = write_folders(folder, plan.folders)
    stage.write_seconds = time.monotonic() - began
    daemon = Runnerd(root / "d")
    try:
        daemon.start(60.0)
        stage.watches.append(timed_watch(daemon, folder, "watch DIR (every folder new)", quiet))
        stage.kept = foreign_kept(paths)
        ctl(daemon, "unwatch", str(folder))
        stage.watches.append(timed_watch(daemon, folder, "watch DIR again (all known)", quiet))
        stage.counts = daemon.counts()
    finally:
        daemon.stop()
    return stage


# --- stage 2: failures grouped over many records ---------------------------------


def failed_lifecycle(index: int, k: int) -> list[Request]:
    """Create, start and fail a run with one of 50 bug shapes; numbers differ per run."""
    run_id = new_run_id()
    shape = k % (len(CLASSES) * len(TEMPLATES))
    cls, template = CLASSES[shape % len(CLASSES)], TEMPLATES[shape // len(CLASSES)]
    return [
        Create(
            key=new_key(),
            run_id=run_id,
            experiment=f"bench-fail-{index}",
            variation=f"v{k % 100}",
            params={"k": k},
        ),
        Start(key=new_key(), run_id=run_id),
        Fail(
            key=new_key(),
            run_id=run_id,
            reason="crash",
            failure_class=cls,
            message=template.format(n=k, m=k % 977 + 1),
        ),
    ]


COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "runnerctl failures --group-by signature --json",
        ("failures", "--group-by", "signature", "--json"),
    ),
    ("runnerctl failures --group-by signature", ("failures", "--group-by", "signature")),
    ("runnerctl failures --group-by class --json", ("failures", "--group-by", "class", "--json")),
    ("runnerctl failures --limit 100", ("failures", "--limit", "100")),
)
REQUESTS: tuple[tuple[str, Request], ...] = (
    ("  daemon: Failures(group_by=signature)", Failures(group_by="signature", limit=100)),
    ("  daemon: Failures(group_by=class)", Failures(group_by="class", limit=100)),
    ("  daemon: Failures(limit=100)", Failures(limit=100)),
)


@dataclass
class FailureStage:
    records: int
    fill_seconds: float = 0.0
    fill_errors: int = 0
    backlog_seconds: float = 0.0
    groups: int = 0
    grouped: int = 0
    timings: list[tuple[str, list[float]]] = field(default_factory=list)


def stage_failures(root: Path, plan: Plan, quiet: Quiet) -> FailureStage:
    """Fill `plan.failures` failed runs, then time the failure queries."""
    print(f"failures: filling {plan.failures} failed runs", file=sys.stderr, flush=True)
    stage = FailureStage(plan.failures)
    daemon = Runnerd(root / "f")
    try:
        daemon.start(60.0)
        with fillers(
            daemon.socket, plan.failures, plan.fill_procs, plan.fill_window, failed_lifecycle
        ) as (seconds, errors, _):
            stage.fill_seconds, stage.fill_errors = seconds, errors
        stage.backlog_seconds = daemon.wait_idle()
        groups = json.loads(ctl(daemon, *COMMANDS[0][1])[1])
        stage.groups, stage.grouped = len(groups), sum(g["count"] for g in groups)
        print("timing the failure queries", file=sys.stderr, flush=True)
        quiet.wait()
        stage.timings += [
            (label, time_command([*RUNNERCTL, *args], daemon.env, plan.reps))
            for label, args in COMMANDS
        ]
        stage.timings.append(time_floor(plan.reps))
        stage.timings += [
            (label, time_request(daemon.socket, req, plan.reps)) for label, req in REQUESTS
        ]
    finally:
        daemon.stop()
    return stage


# --- output -----------------------------------------------------------------------


def print_import(stage: ImportStage) -> None:
    print(
        f"\nImport of {stage.folders} foreign run folders (metadata.json each; written in "
        f"{stage.write_seconds:.1f} s)"
    )
    print(
        f"{'command':<34} {'wall s':>7} {'folders/s':>9} {'imported':>8} {'known':>6} "
        f"{'busy after s':>12}"
    )
    for w in stage.watches:
        print(
            f"{w.label:<34} {w.seconds:>7.2f} {stage.folders / w.seconds:>9.0f} "
            f"{w.imported:>8} {w.known:>6} {w.busy_after:>12.1f}"
        )
    kept, sample = stage.kept
    print(
        f"foreign metadata.json files still holding the foreign tool's keys after the import: "
        f"{kept} of {sample} sampled"
    )
    print("registry after: " + ", ".join(f"{n} {s}" for s, n in sorted(stage.counts.items())))
    rate = stage.folders / stage.watches[0].seconds if stage.watches else 0.0
    print(f"target: import >= 1000 folders/s: {rate:.0f} {verdict(rate >= 1000)}")


def print_failures(stage: FailureStage) -> None:
    rate = stage.records / stage.fill_seconds if stage.fill_seconds else float("nan")
    print(f"\nFailure queries over {stage.records} failure records (50 bug shapes)")
    print(
        f"filled create+start+fail in {stage.fill_seconds:.1f} s ({rate:.0f}/s, "
        f"{stage.fill_errors} errors); daemon busy {stage.backlog_seconds:.1f} s more "
        f"(metadata.json, crash-file scans); --group-by signature: {stage.groups} groups "
        f"holding {stage.grouped} records"
    )
    print(f"{'command':<48} {'median ms':>9} {'max ms':>7}")
    for label, times in stage.timings:
        print(median_row(label, times, 48))
    grouped = next((t for label, t in stage.timings if "signature --json" in label), None)
    if grouped:
        median = statistics.median(grouped)
        print(
            f"target: failures --group-by signature < 1 s: median {median * 1e3:.0f} ms "
            f"{verdict(median < 1.0)}"
        )


def main() -> None:
    args = arguments(__doc__, "1,000 folders and 10,000 failure records (< 60 s)").parse_args()
    bench = session(args)
    plan = QUICK if args.quick else FULL
    with temp_root() as root:
        os.environ.update(Runnerd(root / "f").env)  # forked clients' spools and run folders
        imports = stage_import(root, plan, bench.quiet)
        failures = stage_failures(root, plan, bench.quiet)
    bench.stop()
    bench.header("indexer", "quick" if args.quick else "full")
    print_import(imports)
    print_failures(failures)


if __name__ == "__main__":
    main()
