"""The daemon's lifecycle: its parts built whole from the settings, start-up (recovery before
serving), serving until SIGTERM/SIGINT, and a graceful shut-down (writes drained, the
registry closed)."""

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
from typing import Any

import anyio
from anyio import CancelScope

from runnerd import __version__, config
from runnerd.admission import listen_backlog
from runnerd.connection import serve_connections
from runnerd.events import Broker
from runnerd.handlers import Context
from runnerd.hooks import HookRunner
from runnerd.indexer import Indexer
from runnerd.maintenance import prune_periodically
from runnerd.metadata import MetadataWriter
from runnerd.mirror import Mirror
from runnerd.processes import ProcessWatcher
from runnerd.progress import Progress
from runnerd.reconciler import recover
from runnerd.registry import Registry
from runnerd.resources import Sampler
from runnerd.spool_replay import (
    hash_spooled_artifacts,
    replay_orphan_spools,
    sweep_orphan_spools,
)
from runnerd.sweeps import ManifestWriter
from runnerd.systemd import Notifier, listen_socket
from runnerd.watchdog import Watchdog
from runnerd_client import trust
from runnerd_client.protocol import Artifact

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
        raise StartupError(
            f"refusing the {what} folder {exc}; remove it, or choose a folder"
            " of your own that only you can write to"
        ) from None


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


class Daemon:
    """runnerd's parts, each built once and whole before anything runs, and the order in
    which they start and stop."""

    def __init__(self, cfg: config.Config, registry: Registry) -> None:
        self.config = cfg
        self.registry = registry
        self.metadata = MetadataWriter()
        self.watchdog = Watchdog(registry)
        self.progress = Progress(cfg.stall_timeout)
        self.watcher = ProcessWatcher(
            registry, before_exit=self._replay_spool_of, explain=self._explain_death
        )
        self.sampler = Sampler(
            registry, self.watcher.runs, cfg.sample_interval, cfg.memory_warning, self.progress
        )
        send, self._spooled_artifacts = anyio.create_memory_object_stream[Artifact](math.inf)
        self.ctx = Context(
            config=cfg,
            registry=registry,
            indexer=Indexer(registry, extra_dirs=cfg.watched_dirs),
            broker=Broker(registry),
            manifests=ManifestWriter(registry),
            started_at=time.time(),
            sampler=self.sampler,
            spooled_artifacts=send,
            hooks=HookRunner(cfg, registry) if cfg.hooks else None,
            mirror=Mirror(
                cfg.mirror,
                registry,
                db=cfg.db,
                socket_path=cfg.socket,
                interval=cfg.mirror_interval,
            )
            if cfg.mirror is not None
            else None,
        )
        ctx = self.ctx
        registry.subscribers += [
            self.metadata.on_commit,
            self.watchdog.on_commit,
            ctx.indexer.on_commit,
            ctx.broker.on_commit,
            ctx.manifests.on_commit,
            *(part.on_commit for part in (ctx.hooks, ctx.mirror) if part is not None),
            self.sampler.on_commit,
            self.progress.on_commit,
        ]

    @classmethod
    async def open(cls, cfg: config.Config) -> Daemon:
        """Check the state folders, open the registry (refusing one it cannot trust) and
        build the rest on it."""
        private_folder(cfg.db.parent, "registry")
        if cfg.hooks:  # their cursors live beside the registry
            private_folder(cfg.db.parent / "hooks", "hooks")
        registry = Registry(
            cfg.db,
            synchronous=cfg.synchronous,
            max_batch=cfg.max_batch,
            busy_timeout_ms=int(cfg.busy_timeout * 1000),
        )
        await registry.open()
        return cls(cfg, registry)

    async def _replay_spool_of(self, pid: int) -> None:
        """What death detection does first: a dead process's spooled events happened before
        its death, so they are applied before its runs are judged."""
        await replay_orphan_spools(self.ctx, pid)

    def _explain_death(self, run_id: str) -> dict[str, Any] | None:
        return self.sampler.explain_death(run_id)

    async def serve(self, sock: socket.socket, notifier: Notifier) -> None:
        """Recover, start the background parts, serve until a signal, then drain writes."""
        ctx, registry = self.ctx, self.registry
        async with anyio.create_task_group() as outer:
            outer.start_soon(registry.run_writer)
            outer.start_soon(hash_spooled_artifacts, ctx, self._spooled_artifacts)
            await recover(ctx, self.watchdog, self.watcher)
            registry.subscribers.append(self.watcher.on_commit)  # recovery judged its pids
            await ctx.indexer.load()
            for task in (
                self.watchdog.run,
                self.watcher.poll,
                ctx.indexer.follow_dirs,
                ctx.indexer.follow_failures,
                self.sampler.run,
                ctx.manifests.run,
                *(part.run for part in (ctx.hooks, ctx.mirror) if part is not None),
            ):
                outer.start_soon(task)
            outer.start_soon(sweep_orphan_spools, ctx, self.config.spool_sweep_interval)
            if self.config.retention:
                outer.start_soon(prune_periodically, registry, self.config.retention)
            log.info(
                "runnerd %s serving %s with registry %s",
                __version__,
                self.config.socket,
                self.config.db,
            )
            async with anyio.create_task_group() as serving:
                serving.start_soon(_until_signal, serving.cancel_scope, notifier)
                serving.start_soon(serve_connections, ctx, sock)
                if self.config.resume_interrupted:
                    serving.start_soon(resume_interrupted, ctx)
                notifier.send("READY=1", f"MAINPID={os.getpid()}")
                if notifier.enabled:
                    serving.start_soon(_inform_systemd, ctx, notifier)
            registry.stop()
            with anyio.move_on_after(self.config.shutdown_grace):
                await registry.drained.wait()
            if ctx.mirror is not None:
                await ctx.mirror.close()
            outer.cancel_scope.cancel()

    async def close(self) -> None:
        self.watcher.close()
        await self.registry.close_db()
        self.metadata.close()
        log.info("runnerd stopped")


async def serve(cfg: config.Config) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, drain writes and close the registry."""
    activated = listen_socket()
    if activated is None:
        prepare_socket_dir(cfg.socket)
    daemon = await Daemon.open(cfg)
    try:
        sock = activated or bind_socket(cfg.socket)
        try:
            await daemon.serve(sock, Notifier())
        finally:
            sock.close()
            if activated is None:
                cfg.socket.unlink(missing_ok=True)
    finally:
        await daemon.close()


async def resume_interrupted(ctx: Context) -> None:
    """With `resume_interrupted = true`: relaunch what a crash interrupted, as
    `runnerctl resume --interrupted` would, in a process of its own that outlives us."""
    if not await ctx.registry.read(lambda store: store.views.interrupted_runs(1)):
        return
    log_path = ctx.config.db.parent / "resume-interrupted.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runnerd.cli",
                "--socket",
                str(ctx.config.socket),
                "resume",
                "--interrupted",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    log.info("relaunching interrupted runs (pid %d, log %s)", proc.pid, log_path)
    threading.Thread(target=proc.wait, name="runnerd-resume-reaper", daemon=True).start()
