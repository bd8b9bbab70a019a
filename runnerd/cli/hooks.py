"""runnerctl hooks: the configured hooks, where each is in the event log, its last result."""

from __future__ import annotations

from typing import Any

import click

from runnerd.cli.common import ago, cli, emit_json, json_option, request, say, table
from runnerd_client.protocol import HookList

ERROR_WIDTH = 60


@cli.command()
@json_option
@click.pass_context
def hooks(ctx: click.Context, as_json: bool) -> None:
    """Each hook with its events, backlog, and last result (time, exit, error)."""
    body = request(ctx, HookList())
    if as_json:
        emit_json({"hooks": body["hooks"], "last_seq": body["last_seq"]})
    elif body["hooks"]:
        say(
            table(
                ("NAME", "EVENTS", "BACKLOG", "RETRYING", "DELIVERED", "LAST", "RESULT"),
                [_row(hook) for hook in body["hooks"]],
            )
        )
    else:
        say("no hooks configured (add [[hooks]] tables to the daemon's config.toml)")


def _row(hook: dict[str, Any]) -> tuple[Any, ...]:
    last = hook["last"]
    when = f"{ago(last['at'])}: {last['event']} (seq {last['seq']})" if last else "-"
    return (
        hook["name"],
        ",".join(hook["events"]),
        hook["backlog"],
        hook["retrying"],
        hook["delivered"],
        when,
        _result(last) if last else "-",
    )


def _result(last: dict[str, Any]) -> str:
    if last["ok"]:
        return f"ok in {last['seconds']:.2f}s"
    exit_code = f"exit {last['exit']}" if last["exit"] is not None else "failed"
    error = " ".join((last["error"] or "").split())
    if len(error) > ERROR_WIDTH:
        error = "..." + error[-ERROR_WIDTH:]
    return f"{exit_code}: {error}" if error else exit_code
