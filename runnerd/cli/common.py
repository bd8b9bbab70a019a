"""What every runnerctl command shares: the group, requests and exit codes, formatting."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from runnerd.controls import escape_controls
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.enums import RetryOn
from runnerd_client.protocol import (
    ErrorCode,
    Request,
    RunnerdError,
    Subscribe,
)

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NO_RUN = 1, 2, 3, 4


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


F = TypeVar("F", bound=Callable[..., Any])


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d12h' or a plain number of seconds, 0 or more."""
    seconds = _seconds(text)
    if not 0 <= seconds < float("inf"):
        raise click.BadParameter(f"{text!r}: a duration must be 0 or more")
    return seconds


def parse_timeout(text: str) -> float:
    """A duration that must be positive: a command given none to run would be killed at
    once."""
    seconds = _seconds(text)
    if not 0 < seconds < float("inf"):
        raise click.BadParameter(f"{text!r}: a timeout must be positive")
    return seconds


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 15m, 2h or 1d")
    return sum(float(n) * _UNITS[u] for n, u in parts)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.I)


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB' or a plain number of bytes (powers of 1024), positive."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 100M or 2G")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))
    if size <= 0:
        raise click.BadParameter(f"{text!r}: a size must be positive")
    return size


def parse_params(pairs: Sequence[str], option: str = "--param") -> dict[str, Any]:
    """k=v pairs; a value that parses as JSON (a number, true, a list) keeps its type."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not k=v", param_hint=option)
        params[key] = parse_value(value)
    return params


def parse_value(text: str) -> Any:
    """A value from the command line: JSON when it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def choice(values: Iterable[str]) -> click.Choice[str]:
    """A closed set on the command line (an enum's values), taken in any case
    (`--state RUNNING`)."""
    return click.Choice([str(v) for v in values], case_sensitive=False)


def retry_options(fn: F) -> F:
    """--retries, --backoff and --retry-on, as exec and sweep run take them."""
    for option in reversed(
        (
            click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True),
            click.option(
                "--backoff",
                type=click.FloatRange(min=0),
                default=2.0,
                show_default=True,
                help="Wait backoff**attempt seconds (with jitter) before a retry.",
            ),
            click.option(
                "--retry-on",
                type=choice(RetryOn),
                default="retryable",
                show_default=True,
                help="Retry only failures diagnosed retryable, or any.",
            ),
        )
    ):
        fn = option(fn)
    return fn


def shown(value: Any) -> str:
    """One value in a line of human output (a name, a message, a path, from the registry or
    a file): every control character escaped, a newline too, so that it can neither forge
    a line nor drive the terminal."""
    return escape_controls(str(value))


def say(text: str, *, err: bool = False, nl: bool = True) -> None:
    """Print human output: control characters escaped but the layout's own newlines and
    tabs, whatever a value in `text` holds (JSON output goes through `emit_json`)."""
    click.echo(escape_controls(text, keep="\n\t"), err=err, nl=nl)


def fail(message: str, code: int) -> NoReturn:
    say(f"runnerctl: {message}", err=True)
    sys.exit(code)


def refused(exc: RunnerdError, prefix: str = "") -> NoReturn:
    """Exit with a refusal from the daemon: 4 for no such run or sweep (the one code for a
    thing that is not there), 1 for anything else."""
    fail(f"{prefix}{exc.message}", EXIT_NO_RUN if exc.code == ErrorCode.UNKNOWN_RUN else EXIT_ERROR)


def request(ctx: click.Context, req: Request) -> dict[str, Any]:
    """Send one request to the daemon; map failures to SPEC §6 exit codes."""
    socket_path: Path | None = ctx.obj["socket"]
    try:
        conn = Connection(socket_path)
        try:
            return conn.call(req)
        finally:
            conn.close()
    except DaemonUnavailable as exc:
        fail(f"{exc.message}\n(is the daemon running? start it with `runnerd`)", EXIT_UNREACHABLE)
    except RunnerdError as exc:
        refused(exc)


class Progress:
    """A one-line progress note on stderr, only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown = sys.stderr.isatty()
        self.started = time.monotonic()
        self._stop = threading.Event()

    def update(self, done: int | None = None) -> None:
        if self.shown:
            count = f" {done:,}" if done is not None else ""
            elapsed = time.monotonic() - self.started
            click.echo(f"\r{shown(self.label)}{count} ({elapsed:.0f} s)", nl=False, err=True)

    def __enter__(self) -> Progress:
        if self.shown:
            threading.Thread(target=self._tick, daemon=True).start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.update()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.shown:
            click.echo("\r\033[K", nl=False, err=True)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


# --- human formatting -------------------------------------------------------


def local_time(ts: str | None) -> str:
    if not ts:
        return "-"
    return datetime.fromisoformat(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def ago(ts: str | None) -> str:
    if not ts:
        return "-"
    return span(time.time() - datetime.fromisoformat(ts).timestamp()) + " ago"


def span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns; each cell `shown` (a newline in a value cannot break a row)."""
    cells = [[str(c) for c in headers], *[[shown(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def failure_summary(run: dict[str, Any]) -> str:
    failure = run.get("failure")
    if not failure:
        return ""
    message = failure["message"].splitlines()[0] if failure["message"] else ""
    text = f"{failure['failure_class']}: {message}" if message else failure["failure_class"]
    return text[:60]


# --- commands ---------------------------------------------------------------


def refuse_repeated(
    ctx: click.Context, command: click.Command, args: Sequence[str], *, up_to_positional: bool
) -> None:
    """An option that takes one value, given twice, is a usage error: click would keep the
    last one silently (`--state a --state b`). A group's options end at its subcommand."""
    options = {
        name: param
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    }
    seen: set[str | None] = set()
    tokens = iter(args)
    for token in tokens:
        if token == "--" or (up_to_positional and not token.startswith("-")):
            return
        option = options.get(token.split("=", 1)[0])
        if option is None:
            continue
        if not option.multiple and not option.count:
            if option.name in seen:
                raise click.UsageError(f"{token.split('=', 1)[0]} given more than once", ctx)
            seen.add(option.name)
        if not option.is_flag and not option.count and "=" not in token:
            next(tokens, None)  # its value


class OneValueCommand(click.Command):
    """A command whose single-valued options refuse a repetition."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated(ctx, self, args, up_to_positional=False)
        return super().parse_args(ctx, args)


class OneValueGroup(click.Group):
    """A group like OneValueCommand, whose commands and subgroups are so too."""

    command_class = OneValueCommand
    group_class = type

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated(ctx, self, args, up_to_positional=True)
        return super().parse_args(ctx, args)


# Commands that merge the answers of several daemons (`--socket A --socket B`).
MULTI_DAEMON_COMMANDS = ("status", "list", "show", "failures", "diagnose", "report", "follow")


@click.group(cls=OneValueGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_paths",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Daemon socket (default: $RUNNERD_SOCKET or the XDG runtime path). Repeat "
    f"it to query several as one: {', '.join(MULTI_DAEMON_COMMANDS)}.",
)
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    help="Ask the daemon of every node of the Dask cluster whose scheduler is at "
    f"ADDRESS, through the cluster: {', '.join(MULTI_DAEMON_COMMANDS)}.",
)
@click.version_option(package_name="runnerd", prog_name="runnerctl")
@click.pass_context
def cli(ctx: click.Context, socket_paths: tuple[Path, ...], dask_address: str | None) -> None:
    """Query and command the runnerd daemon."""
    env = os.environ.get("RUNNERD_SOCKET")
    sockets = list(socket_paths) or ([Path(env)] if env else [])
    if (len(sockets) > 1 or dask_address) and ctx.invoked_subcommand not in MULTI_DAEMON_COMMANDS:
        raise click.UsageError(
            f"{ctx.invoked_subcommand} talks to one daemon: give one --socket (several, or "
            f"--dask, are for {', '.join(MULTI_DAEMON_COMMANDS)})"
        )
    ctx.obj = {"socket": sockets[0] if sockets else None, "sockets": sockets, "dask": dask_address}


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


def subscribed(ctx: click.Context, **filters: Any) -> Connection:
    """A connection that receives events (exit 3 if the daemon is unreachable)."""
    try:
        conn = Connection(ctx.obj["socket"])
        conn.call(Subscribe(**filters))
    except DaemonUnavailable as exc:
        fail(exc.message, EXIT_UNREACHABLE)
    return conn
