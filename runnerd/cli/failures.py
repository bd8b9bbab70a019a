"""Why runs failed: failures, diagnose, report, export."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from runnerd.cli.common import (
    Progress,
    choice,
    cli,
    emit_json,
    failure_summary,
    json_option,
    local_time,
    parse_duration,
    request,
    say,
    shown,
    span,
    table,
)
from runnerd.cli.nodes import diagnose_many, failures_many, from_option, list_many, several
from runnerd_client.protocol import (
    Export,
    ExportWhat,
    Failures,
    GroupBy,
    ListRuns,
)


@cli.command()
@click.option("--group-by", type=choice(GroupBy), help="Group the failures and count them.")
@click.option("--since", type=parse_duration, help="Failed within this long, e.g. 12h.")
@click.option("--experiment", help="Only this experiment.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@from_option
@json_option
@click.pass_context
def failures(
    ctx: click.Context,
    group_by: str | None,
    since: float | None,
    experiment: str | None,
    limit: int,
    from_dir: Path | None,
    as_json: bool,
) -> None:
    """Failure records, newest first, or grouped with counts; of several daemons (or export
    files) merged."""
    req = Failures(
        group_by=group_by,
        experiment=experiment,
        limit=limit,
        since=time.time() - since if since is not None else None,
    )
    many = from_dir is not None or several(ctx)
    rows = (
        failures_many(ctx, req, from_dir)
        if many
        else request(ctx, req)["groups" if group_by else "failures"]
    )
    if as_json:
        emit_json(rows)
    elif not rows:
        say("no failures")
    elif group_by:
        say(groups_table(group_by, rows))
    else:
        say(failures_table(rows, hosts=many))


def failures_table(records: Sequence[dict[str, Any]], hosts: bool = False) -> str:
    """With `hosts` (several daemons), a HOST column comes first. CATEGORY and RETRY are the
    diagnosis: what kind of failure, and whether a rerun as is may help."""
    return table(
        ("HOST",) * hosts
        + ("RUN", "WHEN", "EXPERIMENT", "REASON", "CATEGORY", "RETRY", "FAILURE", "SIGNATURE"),
        [
            (f.get("host") or "-",) * hosts
            + (
                f["run_id"],
                local_time(f["at"]),
                f["experiment"],
                f["reason"],
                f.get("category") or "-",
                _retry(f.get("retryable")),
                failure_summary({"failure": f}),
                f["signature"],
            )
            for f in records
        ],
    )


def _retry(retryable: Any) -> str:
    return "-" if retryable is None else "yes" if retryable else "no"


def groups_table(group_by: str, groups: Sequence[dict[str, Any]]) -> str:
    return table(
        ("COUNT", group_by.upper(), "FIRST SEEN", "LAST SEEN", "EXAMPLE", "RUNS"),
        [
            (
                g["count"],
                g["key"],
                local_time(g["first_seen"]),
                local_time(g["last_seen"]),
                failure_summary({"failure": g["example"]}),
                " ".join(g["run_ids"][:3]),
            )
            for g in groups
        ],
    )


@cli.command()
@click.argument("run", required=False)
@click.option("--latest", is_flag=True, help="Only the most recent failure.")
@click.option("--experiment", help="Only this experiment's failures.")
@click.option("--since", type=parse_duration, help="Failed within this long, e.g. 12h.")
@from_option
@json_option
@click.pass_context
def diagnose(
    ctx: click.Context,
    run: str | None,
    latest: bool,
    experiment: str | None,
    since: float | None,
    from_dir: Path | None,
    as_json: bool,
) -> None:
    """What went wrong: failures by category, with the pattern, a suggestion, and whether a
    rerun may help; of several daemons (or a folder) each failure once. Heuristics only:
    no network, no model."""
    from runnerd.diagnosis import findings

    req = Failures(
        run=run,
        experiment=experiment,
        limit=1 if latest else 10_000,
        since=time.time() - since if since is not None else None,
    )
    records: list[Any] = (
        diagnose_many(ctx, req, from_dir)
        if from_dir is not None or several(ctx)
        else request(ctx, req)["failures"]
    )
    found = findings(records)
    if as_json:
        emit_json({"failures": len(records), "findings": found})
        return
    if not records:
        say("no failures")
    for f in found:
        flag = "retryable" if f["retryable"] else "not retryable"
        say(f"{f['count']} x {f['category']} ({flag}): {shown(f['pattern'])}")
        say(f"    e.g. {shown(failure_summary({'failure': f['example']}))}")
        if run is not None and len(records) == 1 and len(records[0]["message"] or "") > 60:
            say(f"    in full: {shown(records[0]['message'])}")  # what a stall measured
        say(f"    runs: {shown(' '.join(f['run_ids']))}")
        say(f"    suggestion: {shown(f['suggestion'])}")


@cli.command()
@click.option(
    "--since",
    type=parse_duration,
    default="24h",
    show_default=True,
    help="The window: runs created within this long.",
)
@click.option("--experiment", help="Only this experiment.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML page with a timeline.",
)
@from_option
@json_option
@click.pass_context
def report(
    ctx: click.Context,
    since: float,
    experiment: str | None,
    html_path: Path | None,
    from_dir: Path | None,
    as_json: bool,
) -> None:
    """What ran in the window: counts, failures by signature with advice, longest and
    still-running runs; of several daemons (or a folder) each run once."""
    from runnerd.cli import report as rpt

    start = time.time() - since
    req = ListRuns(since=start, experiment=experiment, limit=10_000)
    runs = (
        list_many(ctx, req, from_dir)
        if from_dir is not None or several(ctx)
        else request(ctx, req)["runs"]
    )
    body = rpt.build(runs, start)
    if html_path is not None:
        html_path.write_text(rpt.render_html(body, runs))
    if as_json:
        emit_json(body)
        return
    counts = ", ".join(f"{n} {state}" for state, n in sorted(body["counts"].items()))
    window_start = local_time(datetime.fromtimestamp(start, UTC).isoformat())
    say(f"{body['runs']} run(s) since {window_start}: {counts or 'none'}")
    if body["failure_groups"]:
        say("\nFailures by signature")
        say(
            table(
                ("COUNT", "CATEGORY", "RETRY", "FAILURE", "SUGGESTION"),
                [
                    (
                        g["count"],
                        g["category"],
                        "yes" if g["retryable"] else "no",
                        failure_summary({"failure": g}),
                        g["suggestion"],
                    )
                    for g in body["failure_groups"]
                ],
            )
        )
    say("\nLongest runs")
    say(
        table(
            ("RUN", "EXPERIMENT", "STATE", "RUNTIME"),
            [
                (r["run_id"], r["experiment"], r["state"], span(r["runtime_sec"]))
                for r in body["longest"]
            ],
        )
    )
    if body["running"]:
        say(f"\nStill running: {' '.join(body['running'])}")
    if html_path is not None:
        say(f"\nwrote {html_path}")


def export_line(what: str, item: dict[str, Any]) -> dict[str, Any]:
    """A failure gains `timestamp` and `details` (phase, task_id, worker_id, traceback), the
    keys other failure-log tools read; the daemon says what its run knows of them."""
    if what == "failures":
        known = item.get("details") or {}
        return {
            **item,
            "timestamp": item["at"],
            "details": {
                "phase": known.get("phase", item.get("phase")),
                "task_id": known.get("task_id", item["run_id"]),
                "worker_id": known.get("worker_id"),
                "traceback": item.get("traceback"),
            },
        }
    return item


@cli.command()
@click.option("--what", type=choice(ExportWhat), default="runs", show_default=True)
@click.option("--format", "fmt", type=choice(["jsonl"]), default="jsonl", show_default=True)
@click.option(
    "--env",
    "with_env",
    is_flag=True,
    help="Runs with the environment each was launched with, values included.",
)
@click.pass_context
def export(ctx: click.Context, what: str, fmt: str, with_env: bool) -> None:
    """Dump the registry, one JSON object per line, for jq, grep and other tools."""
    if with_env and what != ExportWhat.RUNS:
        raise click.UsageError("--env goes with --what runs")
    after: str | None = None
    done = 0
    with Progress(f"exporting {what}") as progress:
        while True:
            page = request(ctx, Export(what=what, after=after, env=with_env))
            for item in page["items"]:
                click.echo(json.dumps(export_line(what, item), sort_keys=True))
            done += len(page["items"])
            progress.update(done)
            after = page["next"]
            if after is None:
                return
