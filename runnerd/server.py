"""The daemon's lifecycle: start-up, serving, signals and graceful shutdown."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import anyio
import click
from anyio import CancelScope
from anyio.abc import SocketListener

from runnerd import __version__, config
from runnerd.connection import serve_connections
from runnerd.handlers import Context
from runnerd.indexer import Indexer
from runnerd.metadata import MetadataWriter
from runnerd.processes import ProcessWatcher
from runnerd.reconciler import recover, sweep_orphan_spools
from runnerd.registry import Registry
from runnerd.watchdog import Watchdog
from runnerd_client.protocol import RunnerdError

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


def prepare_socket_dir(path: Path) -> None:
    """Make the socket's folder private (0700) and refuse to replace a live daemon's socket."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise StartupError(f"{folder} belongs to uid {info.st_uid}, not to us")
    if stat.S_IMODE(info.st_mode) != 0o700:
        folder.chmod(0o700)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise StartupError(f"another runnerd is already serving {path}")
        finally:
            probe.close()


async def _until_signal(scope: CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


async def serve(cfg: config.Config) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, drain writes and close the registry."""
    prepare_socket_dir(cfg.socket)
    registry = Registry(cfg.db, synchronous=cfg.synchronous, max_batch=cfg.max_batch)
    await registry.open()
    metadata = MetadataWriter()
    watchdog = Watchdog(registry)
    watcher = ProcessWatcher(registry)
    registry.subscribers += [metadata.on_commit, watchdog.on_commit]
    indexer = Indexer(registry)
    registry.subscribers.append(indexer.on_commit)
    ctx = Context(config=cfg, registry=registry, indexer=indexer, started_at=time.time())
    try:
        listener = await anyio.create_unix_listener(cfg.socket, mode=0o600)
        try:
            await _serve_until_signal(ctx, listener, watchdog, watcher)
        finally:
            cfg.socket.unlink(missing_ok=True)
    finally:
        watcher.close()
        await registry.close_db()
        metadata.close()
        log.info("runnerd stopped")


async def _serve_until_signal(ctx: Context, listener: SocketListener, watchdog: Watchdog,
                              watcher: ProcessWatcher) -> None:
    registry = ctx.registry
    async with anyio.create_task_group() as outer:
        outer.start_soon(registry.run_writer)
        await recover(ctx, watchdog, watcher)
        registry.subscribers.append(watcher.on_commit)  # recovery judged the pids it replayed
        outer.start_soon(watchdog.run)
        outer.start_soon(watcher.poll)
        outer.start_soon(sweep_orphan_spools, ctx, ctx.config.spool_sweep_interval)
        await ctx.indexer.load()
        outer.start_soon(ctx.indexer.follow_dirs)
        outer.start_soon(ctx.indexer.follow_failures)
        log.info("runnerd %s serving %s with registry %s", __version__, ctx.config.socket,
                 ctx.config.db)
        async with anyio.create_task_group() as serving:
            serving.start_soon(_until_signal, serving.cancel_scope)
            raw = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            serving.start_soon(serve_connections, ctx, raw)
        await listener.aclose()
        registry.stop()
        with anyio.move_on_after(ctx.config.shutdown_grace):
            await registry.drained.wait()
        outer.cancel_scope.cancel()


def setup_logging(level: str) -> None:
    """Plain level-prefixed lines on stderr; journald adds its own timestamps."""
    under_journal = "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else (
        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    logging.getLogger("aiosqlite").setLevel(logging.INFO)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="Unix socket.")
@click.option("--db", type=click.Path(path_type=Path), help="SQLite registry file.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.toml.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.version_option(__version__, prog_name="runnerd")
def main(socket_path: Path | None, db: Path | None, config_path: Path | None,
         log_level: str) -> None:
    """Run the runnerd daemon in the foreground."""
    setup_logging(log_level)
    try:
        cfg = config.load(config_path, socket=socket_path, db=db)
        anyio.run(serve, cfg)
    except (config.ConfigError, StartupError, RunnerdError, OSError) as exc:
        log.error("%s", exc)
        sys.exit(1)
