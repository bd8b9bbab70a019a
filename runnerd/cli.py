"""runnerctl: thin click commands over the client connection (SPEC §6).

Imports stay light (no daemon modules, no SQLite) so `runnerctl status` starts fast.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.ids import new_key
from runnerd_client.protocol import (
    Cancel,
    ErrorCode,
    Export,
    Failures,
    Get,
    ListRuns,
    Prune,
    Request,
    RunnerdError,
    State,
    Status,
    Subscribe,
    Unwatch,
    Watch,
)

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NO_RUN = 1, 2, 3, 4
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d12h' or a plain number of seconds."""
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
    """'512M', '2G', '1.5GiB' or a plain number of bytes (powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 100M or 2G")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"runnerctl: {message}", err=True)
    sys.exit(code)


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
        _fail(f"{exc.message}\n(is the daemon running? start it with `runnerd`)",
              EXIT_UNREACHABLE)
    except RunnerdError as exc:
        _fail(exc.message, EXIT_NO_RUN if exc.code == ErrorCode.UNKNOWN_RUN else EXIT_ERROR)


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
            click.echo(f"\r{self.label}{count} ({elapsed:.0f} s)", nl=False, err=True)

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


def _local(ts: str | None) -> str:
    if not ts:
        return "-"
    return datetime.fromisoformat(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _ago(ts: str | None) -> str:
    if not ts:
        return "-"
    return _span(time.time() - datetime.fromisoformat(ts).timestamp()) + " ago"


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _runtime(run: dict[str, Any]) -> str:
    if not run.get("started_at"):
        return "-"
    end = datetime.fromisoformat(run["ended_at"]).timestamp() if run.get("ended_at") \
        else time.time()
    return _span(end - datetime.fromisoformat(run["started_at"]).timestamp())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _failure_summary(run: dict[str, Any]) -> str:
    failure = run.get("failure")
    if not failure:
        return ""
    message = failure["message"].splitlines()[0] if failure["message"] else ""
    text = f"{failure['failure_class']}: {message}" if message else failure["failure_class"]
    return text[:60]


def _memory(run: dict[str, Any]) -> str:
    use = run.get("resources")
    return _bytes(use["peak_rss_bytes"]) if use else "-"


def _cpu(run: dict[str, Any]) -> str:
    use = run.get("resources")
    return f"{use['cpu_seconds']:.1f}s" if use else "-"


def _bytes(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    return table(
        ("RUN", "EXPERIMENT", "VARIATION", "ATT", "STATE", "CREATED", "RUNTIME", "PEAK MEM",
         "CPU", "FAILURE"),
        [(r["run_id"], r["experiment"], r["variation"], r["attempt"], r["state"],
          _local(r["created_at"]), _runtime(r), _memory(r), _cpu(r), _failure_summary(r))
         for r in runs],
    )


# --- commands ---------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="RUNNERD_SOCKET",
              help="Daemon socket (default: $RUNNERD_SOCKET or the XDG runtime path).")
@click.version_option(package_name="runnerd", prog_name="runnerctl")
@click.pass_context
def cli(ctx: click.Context, socket_path: Path | None) -> None:
    """Query and command the runnerd daemon."""
    ctx.obj = {"socket": socket_path}


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")


@cli.command()
@json_option
@click.option("--watch", is_flag=True, help="Redraw as runs change (driven by events).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="With --watch: redraw at most this often.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: bool, interval: float) -> None:
    """Daemon health, counts by state, active runs and latest failures."""
    if watch:
        watch_status(ctx, interval)
        return
    body = request(ctx, Status())
    body.pop("id", None)
    body.pop("ok", None)
    if as_json:
        emit_json(body)
    else:
        click.echo(render_status(body))


def render_status(body: dict[str, Any]) -> str:
    d = body["daemon"]
    lines = [f"runnerd {d['version']} (pid {d['pid']}), up {_span(d['uptime_sec'])}, "
             f"{d['clients']} client(s)",
             f"socket {d['socket']}\nregistry {d['db']} ({d['db_bytes'] / 1e6:.1f} MB)"]
    counts = body["counts"]
    summary = ", ".join(f"{counts[s]} {s}" for s in State if counts.get(s))
    lines.append(f"\n{sum(counts.values())} run(s){': ' + summary if summary else ''}")
    if body["active"]:
        lines += ["\nActive runs", runs_table(body["active"])]
    if body["failures"]:
        lines += ["\nLatest failures", table(("RUN", "WHEN", "REASON", "FAILURE"), [
            (f["run_id"], _ago(f["at"]), f["reason"], _failure_summary({"failure": f}))
            for f in body["failures"]])]
    return "\n".join(lines)


def subscribed(ctx: click.Context, **filters: Any) -> Connection:
    """A connection that receives events (exit 3 if the daemon is unreachable)."""
    try:
        conn = Connection(ctx.obj["socket"])
        conn.call(Subscribe(**filters))
    except DaemonUnavailable as exc:
        _fail(exc.message, EXIT_UNREACHABLE)
    return conn


def watch_status(ctx: click.Context, interval: float) -> None:
    """Redraw when something changes (at most every `interval` s; at least every 30 s)."""
    events = subscribed(ctx)
    try:
        while True:
            drawn = time.monotonic()
            click.echo("\033[H\033[2J" + render_status(request(ctx, Status())), nl=True)
            events.next_event(timeout=30.0)
            time.sleep(max(0.0, interval - (time.monotonic() - drawn)))
            while events.next_event(timeout=0) is not None:
                pass
    except DaemonUnavailable:
        _fail("the daemon went away", EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        pass


def describe(event: dict[str, Any]) -> str:
    kind = event["event"]
    if kind == "transition":
        return f"{event['from'] or '-'} -> {event['to']} ({event['cause']}, {event['source']})"
    if kind == "artifact":
        return f"artifact {event['path']} ({event['size']} bytes)"
    if kind == "checkpoint":
        return f"checkpoint {json.dumps(event['data'])}" + (
            f" {event['path']}" if event["path"] else "")
    if kind == "failure":
        return f"failure {event['failure_class']}: {event['message']} [{event['category']}]"
    return str(kind)


def run_exit_status(ctx: click.Context, run_id: str) -> int:
    """A followed run's outcome as an exit status: 0, the command's own code, or 1."""
    run = request(ctx, Get(run=run_id))["run"]
    if run["state"] == State.SUCCEEDED:
        return 0
    code = (run["failure"] or {}).get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


@cli.command()
@click.argument("run", required=False)
@click.option("--experiment", help="Follow every run of this experiment.")
@json_option
@click.pass_context
def follow(ctx: click.Context, run: str | None, experiment: str | None, as_json: bool) -> None:
    """Print events as they happen. With RUN: from its start, until it ends, and exit with
    its outcome (0 succeeded, else the command's exit code or 1)."""
    run_id = request(ctx, Get(run=run))["run"]["run_id"] if run else None
    last = 0 if run_id else None
    while True:
        events = subscribed(ctx, run=run_id, experiment=experiment, since=last)
        try:
            while (event := events.next_event()) is not None:
                if event["event"] == "lagged":
                    click.echo(f"runnerctl: lagged, {event['dropped']} events dropped; "
                               "catching up", err=True)
                    last = event["seq"]
                    break
                last = event["seq"]
                click.echo(json.dumps(event, sort_keys=True) if as_json else
                           f"{_local(event['at'])} {event['run_id']} {event['experiment']}: "
                           f"{describe(event)}")
                if run_id and event["event"] == "transition" and State(event["to"]).terminal:
                    sys.exit(run_exit_status(ctx, run_id))
        except DaemonUnavailable:
            _fail("the daemon went away", EXIT_UNREACHABLE)
        finally:
            events.close()


@cli.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only this state.")
@click.option("--experiment", help="Only this experiment.")
@click.option("--since", type=parse_duration, help="Created within this long, e.g. 12h.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@click.pass_context
def list_runs(ctx: click.Context, state: str | None, experiment: str | None,
              since: float | None, limit: int, as_json: bool) -> None:
    """Runs, newest first."""
    runs = request(ctx, ListRuns(state=state, experiment=experiment, limit=limit,
                                 since=time.time() - since if since is not None else None))["runs"]
    if as_json:
        emit_json(runs)
    elif runs:
        click.echo(runs_table(runs))
    else:
        click.echo("no runs")


def _show_human(run: dict[str, Any]) -> None:
    fields: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("run", lambda r: r["run_id"]),
        ("experiment", lambda r: f"{r['experiment']} / {r['variation']} (attempt {r['attempt']})"),
        ("state", lambda r: r["state"]),
        ("params", lambda r: json.dumps(r["params"])),
        ("run_dir", lambda r: r["run_dir"]),
        ("host / pids", lambda r: f"{r['host'] or '-'} / {r['pids'] or '-'}"),
        ("created", lambda r: _local(r["created_at"])),
        ("started", lambda r: _local(r["started_at"])),
        ("ended", lambda r: _local(r["ended_at"])),
        ("runtime", _runtime),
        ("heartbeats", lambda r: f"{r['heartbeats']} (last {_ago(r['last_heartbeat_at'])})"),
        ("resources", lambda r: f"peak {_memory(r)} of {_bytes(r['resources']['limit_bytes'])}"
                                f", CPU {_cpu(r)}" if r.get("resources") else "-"),
    ]
    for name, get in fields:
        click.echo(f"{name:<12} {get(run)}")
    click.echo("\nTransitions")
    click.echo(table(("WHEN", "FROM", "TO", "CAUSE", "SOURCE"), [
        (_local(t["at"]), t["from"] or "-", t["to"], t["cause"], t["source"])
        for t in run["transitions"]]))
    if run["artifacts"]:
        click.echo("\nArtifacts")
        click.echo(table(("PATH", "SIZE", "SHA256"), [
            (a["path"], a["size"], a["sha256"][:16]) for a in run["artifacts"]]))
    if run["checkpoints"]:
        click.echo("\nCheckpoints")
        click.echo(table(("SEQ", "WHEN", "DATA", "PATH"), [
            (c["seq"], _local(c["at"]), json.dumps(c["data"]), c["path"] or "-")
            for c in run["checkpoints"]]))
    for warning in (run.get("resources") or {}).get("warnings", []):
        click.echo(f"\nwarning ({_local(warning['at'])}): {warning['message']}")
    if run.get("crash_files"):
        click.echo("\nCrash files")
        click.echo(table(("PATH", "KIND", "SIZE"), [
            (f["path"], f["kind"], f["size"]) for f in run["crash_files"]]))
    failure = run.get("failure")
    if failure:
        click.echo(f"\nFailure: {failure['failure_class']} ({failure['reason']}), "
                   f"signature {failure['signature']}")
        if failure["message"]:
            click.echo(failure["message"])
        if failure.get("traceback"):
            click.echo("\n" + failure["traceback"].rstrip())


@cli.command()
@click.argument("run")
@json_option
@click.pass_context
def show(ctx: click.Context, run: str, as_json: bool) -> None:
    """One run: fields, transitions, artifacts, checkpoints and failure."""
    obj = request(ctx, Get(run=run))["run"]
    if as_json:
        emit_json(obj)
    else:
        _show_human(obj)


@cli.command()
@click.option("--group-by", type=click.Choice(["class", "signature", "category"]),
              help="Group the failures and count them.")
@click.option("--since", type=parse_duration, help="Failed within this long, e.g. 12h.")
@click.option("--experiment", help="Only this experiment.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@json_option
@click.pass_context
def failures(ctx: click.Context, group_by: str | None, since: float | None,
             experiment: str | None, limit: int, as_json: bool) -> None:
    """Failure records, newest first, or grouped with counts."""
    body = request(ctx, Failures(group_by=group_by, experiment=experiment, limit=limit,
                                 since=time.time() - since if since is not None else None))
    rows = body["groups"] if group_by else body["failures"]
    if as_json:
        emit_json(rows)
    elif not rows:
        click.echo("no failures")
    elif group_by:
        click.echo(groups_table(group_by, rows))
    else:
        click.echo(table(("RUN", "WHEN", "EXPERIMENT", "REASON", "FAILURE", "SIGNATURE"), [
            (f["run_id"], _local(f["at"]), f["experiment"], f["reason"],
             _failure_summary({"failure": f}), f["signature"]) for f in rows]))


def groups_table(group_by: str, groups: Sequence[dict[str, Any]]) -> str:
    return table(("COUNT", group_by.upper(), "FIRST SEEN", "LAST SEEN", "EXAMPLE", "RUNS"), [
        (g["count"], g["key"], _local(g["first_seen"]), _local(g["last_seen"]),
         _failure_summary({"failure": g["example"]}), " ".join(g["run_ids"][:3]))
        for g in groups])


@cli.command()
@click.argument("run", required=False)
@click.option("--latest", is_flag=True, help="Only the most recent failure.")
@click.option("--experiment", help="Only this experiment's failures.")
@click.option("--since", type=parse_duration, help="Failed within this long, e.g. 12h.")
@json_option
@click.pass_context
def diagnose(ctx: click.Context, run: str | None, latest: bool, experiment: str | None,
             since: float | None, as_json: bool) -> None:
    """What went wrong: failures by category, with the pattern, a suggestion, and whether a
    rerun may help. Heuristics only: no network, no model."""
    from runnerd.diagnosis import findings

    records = request(ctx, Failures(
        run=run, experiment=experiment, limit=1 if latest else 10_000,
        since=time.time() - since if since is not None else None))["failures"]
    found = findings(records)
    if as_json:
        emit_json({"failures": len(records), "findings": found})
        return
    if not records:
        click.echo("no failures")
    for f in found:
        flag = "retryable" if f["retryable"] else "not retryable"
        click.echo(f"{f['count']} x {f['category']} ({flag}): {f['pattern']}")
        click.echo(f"    e.g. {_failure_summary({'failure': f['example']})}")
        click.echo(f"    runs: {' '.join(f['run_ids'])}")
        click.echo(f"    suggestion: {f['suggestion']}")


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, resolve_path=True))
@click.pass_context
def watch(ctx: click.Context, directory: str) -> None:
    """Index DIRECTORY for crashed and foreign runs: scanned now, then followed."""
    with Progress(f"scanning {directory}"):
        body = request(ctx, Watch(path=directory))
    for warning in body["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"watching {directory}: {body['imported']} run(s) imported, "
               f"{body['indexed']} crash file(s) indexed, {body['known']} already known, "
               f"{len(body['warnings'])} warning(s)")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, resolve_path=True))
@click.pass_context
def unwatch(ctx: click.Context, directory: str) -> None:
    """Stop indexing DIRECTORY (what was imported stays)."""
    request(ctx, Unwatch(path=directory))
    click.echo(f"no longer watching {directory}")


def _params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """k=v pairs; a value that parses as JSON (a number, true, a list) keeps its type."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not k=v", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--experiment", help="Experiment name (default: the command's name).")
@click.option("--variation", default="default", show_default=True)
@click.option("--param", "param_pairs", multiple=True, metavar="K=V", help="A run parameter.")
@click.option("--run-dir", type=click.Path(file_okay=False, resolve_path=True))
@click.option("--timeout", type=parse_duration, help="TERM, then KILL, after this long.")
@click.option("--memory", type=parse_size, help="Run in a memory cgroup limited to this.")
@click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True)
@click.option("--backoff", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Wait backoff**attempt seconds (with jitter) before a retry.")
@click.option("--retry-on", type=click.Choice(["retryable", "any"]), default="retryable",
              show_default=True, help="Retry only failures diagnosed retryable, or any.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_command(ctx: click.Context, experiment: str | None, variation: str,
                 param_pairs: tuple[str, ...], run_dir: str | None, timeout: float | None,
                 memory: int | None, retries: int, backoff: float, retry_on: str,
                 command: tuple[str, ...]) -> None:
    """Run COMMAND as a tracked run; exit with its exit code."""
    from runnerd.launch import Launch, run_with_retries
    from runnerd_client.run import Client

    launch = Launch(command=list(command), params=_params(param_pairs), run_dir=run_dir,
                    experiment=experiment or Path(command[0]).name, variation=variation,
                    timeout=timeout, memory=memory)
    sys.exit(run_with_retries(Client(ctx.obj["socket"]), launch, retries=retries,
                              backoff=backoff, retry_on=retry_on))


@cli.command()
@click.argument("run")
@click.pass_context
def retry(ctx: click.Context, run: str) -> None:
    """Run a run launched by exec again, as the next attempt, with the same command."""
    from runnerd.launch import Launch, run_once
    from runnerd_client.run import Client

    previous = request(ctx, Get(run=run))["run"]
    try:
        launch = Launch.from_run(previous)
    except RunnerdError as exc:
        _fail(exc.message, EXIT_ERROR)
    sys.exit(run_once(Client(ctx.obj["socket"]), launch, retry_of=previous["run_id"]).exit_code)


@cli.command()
@click.argument("run")
@click.option("--signal", "signame", type=click.Choice(["TERM", "KILL", "INT", "HUP"]),
              help="Also send this signal to the run's processes.")
@click.pass_context
def cancel(ctx: click.Context, run: str, signame: str | None) -> None:
    """Mark RUN failed_abandoned, signalling its processes if asked."""
    run_id = request(ctx, Get(run=run))["run"]["run_id"]
    body = request(ctx, Cancel(key=new_key(), run_id=run_id, signal=signame))
    signalled = body.get("signalled") or []
    click.echo(f"{run_id}: {body['state']}" + (
        f"; sent SIG{signame} to {', '.join(map(str, signalled)) or 'no live process'}"
        if signame else ""))


@cli.command()
@click.argument("target", type=click.Path(dir_okay=False, resolve_path=True, path_type=Path))
@click.pass_context
def backup(ctx: click.Context, target: Path) -> None:
    """Copy the registry to TARGET with SQLite's online backup, while the daemon serves."""
    import sqlite3

    db = request(ctx, Status(limit=1))["daemon"]["db"]
    partial = target.with_name(f".{target.name}.partial")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as source, \
                sqlite3.connect(partial) as copy:
            source.backup(copy, pages=4096)
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            runs = copy.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        if check != "ok":
            _fail(f"the copy failed its integrity check: {check}", EXIT_ERROR)
        partial.replace(target)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        _fail(f"backup failed: {exc}", EXIT_ERROR)
    click.echo(f"backed up {runs} runs to {target} ({target.stat().st_size / 1e6:.1f} MB)")


@cli.command()
@click.option("--older-than", type=parse_duration, required=True,
              help="Prune runs that ended longer ago than this, e.g. 30d.")
@click.option("--state", "states", multiple=True,
              type=click.Choice([s.value for s in State if s.terminal]),
              help="Only runs in this terminal state (repeatable).")
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@json_option
@click.pass_context
def prune(ctx: click.Context, older_than: float, states: tuple[str, ...], dry_run: bool,
          as_json: bool) -> None:
    """Delete terminal runs that ended long ago (never a pending, running or lost one)."""
    body = request(ctx, Prune(before=time.time() - older_than, states=list(states) or None,
                              dry_run=dry_run))
    if as_json:
        emit_json({k: body[k] for k in ("count", "run_ids", "dry_run")})
    else:
        click.echo(f"{'would prune' if dry_run else 'pruned'} {body['count']} run(s)")


@cli.group()
def service() -> None:
    """Install runnerd as a systemd user service (socket-activated)."""


@service.command("install")
@click.option("--no-enable", is_flag=True, help="Write the units; do not run systemctl.")
def service_install(no_enable: bool) -> None:
    """Write runnerd.service and runnerd.socket for this interpreter, then enable them."""
    from runnerd import service as svc

    for path in svc.install(svc.unit_dir()):
        click.echo(f"wrote {path}")
    commands = "\n".join("  " + " ".join(cmd) for cmd in svc.ENABLE)
    if no_enable or not svc.user_systemd():
        click.echo(f"to enable it:\n{commands}")
    elif not svc.run_all(svc.ENABLE):
        _fail(f"systemctl failed; to enable it by hand:\n{commands}", EXIT_ERROR)
    else:
        click.echo("enabled and started runnerd.socket")


@service.command("uninstall")
def service_uninstall() -> None:
    """Stop and disable the units, then remove them."""
    from runnerd import service as svc

    if svc.user_systemd():
        svc.run_all(svc.DISABLE)
    removed = svc.uninstall(svc.unit_dir())
    click.echo("\n".join(f"removed {p}" for p in removed) or "no units were installed")


@service.command("status")
def service_status() -> None:
    """Where the units are, and what systemd says of them."""
    from runnerd import service as svc

    for name in svc.UNITS:
        path = svc.unit_dir() / name
        click.echo(f"{name}: {'installed at ' + str(path) if path.exists() else 'not installed'}")
    if svc.user_systemd():
        svc.run_all((["systemctl", "--user", "--no-pager", "status", "runnerd.socket",
                      "runnerd.service"],))
    else:
        click.echo("no systemd user manager here")


@cli.command()
@click.option("--since", type=parse_duration, default="24h", show_default=True,
              help="The window: runs created within this long.")
@click.option("--experiment", help="Only this experiment.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a self-contained HTML page with a timeline.")
@json_option
@click.pass_context
def report(ctx: click.Context, since: float, experiment: str | None, html_path: Path | None,
           as_json: bool) -> None:
    """What ran in the window: counts, failures by signature with advice, longest and
    still-running runs."""
    from runnerd import report as rpt

    start = time.time() - since
    runs = request(ctx, ListRuns(since=start, experiment=experiment, limit=10_000))["runs"]
    body = rpt.build(runs, start)
    if html_path is not None:
        html_path.write_text(rpt.render_html(body, runs))
    if as_json:
        emit_json(body)
        return
    counts = ", ".join(f"{n} {state}" for state, n in sorted(body["counts"].items()))
    window_start = _local(datetime.fromtimestamp(start, UTC).isoformat())
    click.echo(f"{body['runs']} run(s) since {window_start}: {counts or 'none'}")
    if body["failure_groups"]:
        click.echo("\nFailures by signature")
        click.echo(table(("COUNT", "CATEGORY", "RETRY", "FAILURE", "SUGGESTION"), [
            (g["count"], g["category"], "yes" if g["retryable"] else "no",
             _failure_summary({"failure": g}), g["suggestion"])
            for g in body["failure_groups"]]))
    click.echo("\nLongest runs")
    click.echo(table(("RUN", "EXPERIMENT", "STATE", "RUNTIME"), [
        (r["run_id"], r["experiment"], r["state"], _span(r["runtime_sec"]))
        for r in body["longest"]]))
    if body["running"]:
        click.echo(f"\nStill running: {' '.join(body['running'])}")
    if html_path is not None:
        click.echo(f"\nwrote {html_path}")


def export_line(what: str, item: dict[str, Any]) -> dict[str, Any]:
    """A failure gains `timestamp` and `details`, the keys other failure-log tools read."""
    if what == "failures":
        return {**item, "timestamp": item["at"], "details": {
            "phase": item.get("phase"), "task_id": item["run_id"],
            "worker_id": item.get("worker_id"), "traceback": item.get("traceback")}}
    return item


@cli.command()
@click.option("--what", type=click.Choice(["runs", "failures"]), default="runs",
              show_default=True)
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl",
              show_default=True)
@click.pass_context
def export(ctx: click.Context, what: str, fmt: str) -> None:
    """Dump the registry, one JSON object per line, for jq, grep and other tools."""
    after: str | None = None
    done = 0
    with Progress(f"exporting {what}") as progress:
        while True:
            page = request(ctx, Export(what=what, after=after))
            for item in page["items"]:
                click.echo(json.dumps(export_line(what, item), sort_keys=True))
            done += len(page["items"])
            progress.update(done)
            after = page["next"]
            if after is None:
                return


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
