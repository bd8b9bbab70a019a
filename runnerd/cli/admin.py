"""Looking after the daemon: watch/unwatch, backup, prune, service."""

from __future__ import annotations

import time
from pathlib import Path

import click

from runnerd.cli.common import (
    EXIT_ERROR,
    Progress,
    choice,
    cli,
    emit_json,
    fail,
    json_option,
    parse_duration,
    request,
    say,
    shown,
)
from runnerd_client.protocol import (
    Prune,
    State,
    Status,
    Unwatch,
    Watch,
)


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, resolve_path=True))
@click.pass_context
def watch(ctx: click.Context, directory: str) -> None:
    """Index DIRECTORY for crashed and foreign runs: scanned now, then followed."""
    with Progress(f"scanning {directory}"):
        body = request(ctx, Watch(path=directory))
    for warning in body["warnings"]:
        say(f"warning: {shown(warning)}", err=True)
    say(
        f"watching {directory}: {body['imported']} run(s) imported, "
        f"{body['indexed']} crash file(s) indexed, {body['known']} already known, "
        f"{len(body['warnings'])} warning(s)"
    )


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, resolve_path=True))
@click.pass_context
def unwatch(ctx: click.Context, directory: str) -> None:
    """Stop indexing DIRECTORY (what was imported stays)."""
    request(ctx, Unwatch(path=directory))
    say(f"no longer watching {directory}")


@cli.command()
@click.argument("target", type=click.Path(dir_okay=False, resolve_path=True, path_type=Path))
@click.pass_context
def backup(ctx: click.Context, target: Path) -> None:
    """Copy the registry to TARGET with SQLite's online backup, while the daemon serves."""
    from runnerd.registry.upkeep import BackupError
    from runnerd.registry.upkeep import backup as copy_registry

    db = request(ctx, Status(limit=1))["daemon"]["db"]
    try:
        runs = copy_registry(Path(db), target)
    except BackupError as exc:
        fail(str(exc), EXIT_ERROR)
    say(f"backed up {runs} runs to {target} ({target.stat().st_size / 1e6:.1f} MB)")


@cli.command()
@click.option(
    "--older-than",
    type=parse_duration,
    required=True,
    help="Prune runs that ended longer ago than this, e.g. 30d.",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=choice(s for s in State if s.terminal),
    help="Only runs in this terminal state (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@json_option
@click.pass_context
def prune(
    ctx: click.Context, older_than: float, states: tuple[str, ...], dry_run: bool, as_json: bool
) -> None:
    """Delete terminal runs that ended long ago (never a pending, running or lost one)."""
    body = request(
        ctx, Prune(before=time.time() - older_than, states=list(states) or None, dry_run=dry_run)
    )
    if as_json:
        emit_json({k: body[k] for k in ("count", "run_ids", "dry_run")})
    else:
        say(f"{'would prune' if dry_run else 'pruned'} {body['count']} run(s)")


@cli.group()
def service() -> None:
    """Install runnerd as a systemd user service (socket-activated)."""


@service.command("install")
@click.option("--no-enable", is_flag=True, help="Write the units; do not run systemctl.")
def service_install(no_enable: bool) -> None:
    """Write runnerd.service and runnerd.socket for this interpreter, then enable them."""
    from runnerd.cli import service as svc

    for path in svc.install(svc.unit_dir()):
        say(f"wrote {path}")
    commands = "\n".join("  " + " ".join(cmd) for cmd in svc.ENABLE)
    if no_enable or not svc.user_systemd():
        say(f"to enable it:\n{commands}")
    elif not svc.run_all(svc.ENABLE):
        fail(f"systemctl failed; to enable it by hand:\n{commands}", EXIT_ERROR)
    else:
        say("enabled and started runnerd.socket")


@service.command("uninstall")
def service_uninstall() -> None:
    """Stop and disable the units, then remove them."""
    from runnerd.cli import service as svc

    if svc.user_systemd():
        svc.run_all(svc.DISABLE)
    removed = svc.uninstall(svc.unit_dir())
    say("\n".join(f"removed {p}" for p in removed) or "no units were installed")


@service.command("status")
def service_status() -> None:
    """Where the units are, and what systemd says of them."""
    from runnerd.cli import service as svc

    for name in svc.UNITS:
        path = svc.unit_dir() / name
        say(f"{name}: {'installed at ' + str(path) if path.exists() else 'not installed'}")
    if svc.user_systemd():
        svc.run_all(
            (["systemctl", "--user", "--no-pager", "status", "runnerd.socket", "runnerd.service"],)
        )
    else:
        say("no systemd user manager here")
