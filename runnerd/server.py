"""The daemon's lifecycle: start-up, serving, signals and graceful shutdown."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import click
from anyio import CancelScope

from runnerd import __version__, config
from runnerd.admission import listen_backlog
from runnerd.connection import serve_connections
from runnerd.controls import EscapeControls
from runnerd.events import Broker
from runnerd.handlers import Context
from runnerd.hooks import HookRunner
from runnerd.indexer import Indexer
from runnerd.maintenance import prune_periodically
from runnerd.metadata import MetadataWriter
from runnerd.mirror import Mirror
from runnerd.processes import ProcessWatcher
from runnerd.progress import Progress
from runnerd.reconciler import (
    hash_spooled_artifacts,
    recover,
    spool_replayer,
    sweep_orphan_spools,
)
from runnerd.registry import Registry
from runnerd.resources import Sampler
from runnerd.sweeps import ManifestWriter
from runnerd.systemd import Notifier, listen_socket
from runnerd.watchdog import Watchdog
from runnerd_client import trust
from runnerd_client.protocol import Artifact, RunnerdError

log = logging.getLogger(__name__)
STATUS_INTERVAL = 30.0


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


def private_folder(folder: Path, what: str) -> None:
    """Make `folder` (0700) if it is missing; refuse one another user made or can change:
    a planted folder would let them read the registry, forge spools or serve as runnerd."""
    try:
        trust.private_dir(folder)
    except trust.UntrustedPath as exc:
        raise StartupError(f"refusing the {what} folder {exc}; remove it, or choose a folder"
                           " of your own that only you can write to") from None


def prepare_socket_dir(path: Path) -> None:
    """Make the socket's folder private and refuse to replace a live daemon's socket."""
    private_folder(path.parent, "socket")
    info = path.parent.lstat()
    if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) != 0o700:
        path.parent.chmod(0o700)
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


def bind_socket(path: Path) -> socket.socket:
    """Listen on `path`, created 0600 (the umask closes the window before chmod)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(0o600)
    sock.listen(listen_backlog())
    sock.setblocking(False)
    return sock


async def _until_signal(scope: CancelScope, notifier: Notifier) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            notifier.send("STOPPING=1")
            scope.cancel()
            return


async def _inform_systemd(ctx: Context, notifier: Notifier) -> None:
    """WATCHDOG=1 at half the watchdog interval, from the event loop, with a fresh STATUS."""
    interval = notifier.watchdog_interval or STATUS_INTERVAL
    while True:
        counts = await ctx.registry.read(lambda store: store.views.counts())
        status = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("running", "lost", "pending"))
        fields = [f"STATUS={sum(counts.values())} runs: {status}; {ctx.connections} clients"]
        if notifier.watchdog_interval:
            fields.append("WATCHDOG=1")
        notifier.send(*fields)
        await anyio.sleep(interval)


async def serve(cfg: config.Config) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, drain writes and close the registry."""
    activated = listen_socket()
    if activated is None:
        prepare_socket_dir(cfg.socket)
    private_folder(cfg.db.parent, "registry")
    registry = Registry(cfg.db, synchronous=cfg.synchronous, max_batch=cfg.max_batch,
                        busy_timeout_ms=int(cfg.busy_timeout * 1000))
    await registry.open()
    metadata = MetadataWriter()
    watchdog = Watchdog(registry)
    indexer = Indexer(registry, extra_dirs=cfg.watched_dirs)
    broker = Broker(registry)
    manifests = ManifestWriter(registry)
    registry.subscribers += [metadata.on_commit, watchdog.on_commit, indexer.on_commit,
                             broker.on_commit, manifests.on_commit]
    ctx = Context(config=cfg, registry=registry, indexer=indexer, broker=broker,
                  started_at=time.time(), manifests=manifests)
    if cfg.hooks:  # hooks: their cursors live beside the registry; woken by each commit
        private_folder(cfg.db.parent / "hooks", "hooks")
        ctx.hooks = HookRunner(cfg, registry)
        registry.subscribers.append(ctx.hooks.on_commit)
    if cfg.mirror is not None:  # the records kept in a shared folder too, as they change
        ctx.mirror = Mirror(cfg.mirror, registry, db=cfg.db, socket_path=cfg.socket,
                            interval=cfg.mirror_interval)
        registry.subscribers.append(ctx.mirror.on_commit)
    watcher = ProcessWatcher(registry, before_exit=spool_replayer(ctx))
    progress = Progress(cfg.stall_timeout)
    sampler = Sampler(registry, watcher.runs, cfg.sample_interval, cfg.memory_warning, progress)
    watcher.explain = sampler.explain_death
    registry.subscribers += [sampler.on_commit, progress.on_commit]
    ctx.sampler = sampler
    try:
        sock = activated or bind_socket(cfg.socket)
        try:
            await _serve_until_signal(ctx, sock, watchdog, watcher, sampler, Notifier())
        finally:
            sock.close()
            if activated is None:
                cfg.socket.unlink(missing_ok=True)
    finally:
        watcher.close()
        await registry.close_db()
        metadata.close()
        log.info("runnerd stopped")


async def _serve_until_signal(ctx: Context, sock: socket.socket, watchdog: Watchdog,
                              watcher: ProcessWatcher, sampler: Sampler,
                              notifier: Notifier) -> None:
    registry = ctx.registry
    async with anyio.create_task_group() as outer:
        outer.start_soon(registry.run_writer)
        send, receive = anyio.create_memory_object_stream[Artifact](math.inf)
        ctx.spooled_artifacts = send
        outer.start_soon(hash_spooled_artifacts, ctx, receive)
        await recover(ctx, watchdog, watcher)
        registry.subscribers.append(watcher.on_commit)  # recovery judged the pids it replayed
        await ctx.indexer.load()
        for task in (watchdog.run, watcher.poll, ctx.indexer.follow_dirs,
                     ctx.indexer.follow_failures, sampler.run, ctx.manifests.run):
            outer.start_soon(task)
        outer.start_soon(sweep_orphan_spools, ctx, ctx.config.spool_sweep_interval)
        if ctx.hooks is not None:
            outer.start_soon(ctx.hooks.run)
        if ctx.mirror is not None:
            outer.start_soon(ctx.mirror.run)
        if ctx.config.retention:
            outer.start_soon(prune_periodically, ctx.registry, ctx.config.retention)
        log.info("runnerd %s serving %s with registry %s", __version__, ctx.config.socket,
                 ctx.config.db)
        async with anyio.create_task_group() as serving:
            serving.start_soon(_until_signal, serving.cancel_scope, notifier)
            serving.start_soon(serve_connections, ctx, sock)
            if ctx.config.resume_interrupted:
                serving.start_soon(resume_interrupted, ctx)
            notifier.send("READY=1", f"MAINPID={os.getpid()}")
            if notifier.enabled:
                serving.start_soon(_inform_systemd, ctx, notifier)
        registry.stop()
        with anyio.move_on_after(ctx.config.shutdown_grace):
            await registry.drained.wait()
        if ctx.mirror is not None:
            await ctx.mirror.close()
        outer.cancel_scope.cancel()


async def resume_interrupted(ctx: Context) -> None:
    """With `resume_interrupted = true`: relaunch what a crash interrupted, as
    `runnerctl resume --interrupted` would, in a process of its own that outlives us."""
    if not await ctx.registry.read(lambda store: store.views.interrupted_runs(1)):
        return
    log_path = ctx.config.db.parent / "resume-interrupted.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runnerd.cli", "--socket", str(ctx.config.socket), "resume",
             "--interrupted"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True)
    log.info("relaunching interrupted runs (pid %d, log %s)", proc.pid, log_path)
    threading.Thread(target=proc.wait, name="runnerd-resume-reaper", daemon=True).start()


def setup_logging(level: str) -> None:
    """Under systemd, `<N>` priority prefixes and no timestamps (journald adds its own).
    Every record is one line: a path or a value with a newline or ESC cannot forge one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EscapeControls())
    if "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority, as sd-daemon(3) describes."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="Unix socket.")
@click.option("--db", type=click.Path(path_type=Path), help="SQLite registry file.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="config.toml.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
@click.option("--mirror", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the records in this shared folder too (NFS, Lustre, GPFS).")
@click.version_option(__version__, prog_name="runnerd")
def main(socket_path: Path | None, db: Path | None, config_path: Path | None,
         log_level: str, check_config: bool, mirror: Path | None) -> None:
    """Run the runnerd daemon in the foreground."""
    setup_logging(log_level)
    try:
        cfg = config.load(config_path, socket=socket_path, db=db,
                          mirror=mirror.absolute() if mirror else None)
        if check_config:
            click.echo(f"configuration is valid: socket {cfg.socket}, registry {cfg.db}")
            return
        anyio.run(serve, cfg)
    except (config.ConfigError, StartupError, RunnerdError, OSError) as exc:
        log.error("%s", exc)
        sys.exit(1)
