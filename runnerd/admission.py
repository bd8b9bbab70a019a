"""What the served connections share, and how much one may take (README, "Connection
limits"): the count of connections, the memory for large frames, the registry reads in
flight; the kernel's backlog and open-files limit; a peer's credentials; and the limits
each client is told in its greeting."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import resource
import socket
import struct
from collections import deque
from collections.abc import Sized
from pathlib import Path
from typing import Any, Protocol

from runnerd import __version__
from runnerd.config import Config
from runnerd.handlers import Context, Peer
from runnerd_client.procinfo import start_time as process_start_time
from runnerd_client.protocol import MAX_DEPTH, MAX_ITEMS, PROTOCOL_VERSION, ErrorCode

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")
READS_AT_ONCE = 2
"""Registry reads started and not finished, over every connection: the registry has one
thread, so more would only queue there, where a `status` would wait behind them all."""
REFUSAL_LOG_INTERVAL = 10.0


class Connection(Protocol):
    """What the shared bookkeeping needs of a served connection (`connection.FrameProtocol`)."""

    wanted: int  # frame memory it waits for
    scheduled: bool  # waiting in Reads for its turn

    @property
    def reads(self) -> Sized: ...
    def admitted(self) -> None: ...
    def start_read(self) -> bool: ...
    def check_timeouts(self, now: float) -> None: ...
    def close(self) -> None: ...


def listen_backlog() -> int:
    """The kernel's cap on connects waiting to be accepted (net.core.somaxconn)."""
    try:
        return max(socket.SOMAXCONN, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def raise_fd_limit(connections: int) -> None:
    """Let the soft open-files limit hold `connections` sockets and the daemon's own files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning(
                "open files are limited to %d: fewer than max_connections (%d) "
                "connections may be accepted",
                new,
                connections,
            )


def peer_of(sock: socket.socket) -> Peer:
    """The connecting process's pid and uid, from the kernel (SO_PEERCRED)."""
    pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid=pid, uid=uid, start_time=process_start_time(pid))


class FrameMemory:
    """Memory reserved for frames larger than one read, shared by every connection: a
    connection whose frame does not fit waits (unread) until another frame frees room."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waiting: deque[Connection] = deque()

    def reserve(self, size: int) -> bool:
        """Reserve `size` bytes if they fit (one frame always fits when nothing is reserved)."""
        if self.used and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size
        while self.waiting and self.reserve(self.waiting[0].wanted):
            self.waiting.popleft().admitted()


class Reads:
    """Registry reads of every connection, READS_AT_ONCE at a time, from the connection with
    the fewest waiting first: a client that floods reads waits behind its own reads, and a
    `status` from anyone else is next."""

    def __init__(self) -> None:
        self.running = 0
        self.ready: list[tuple[int, int, Connection]] = []
        self.order = itertools.count()

    def offer(self, conn: Connection) -> None:
        """`conn` has a read to start (once: it comes back for its next one)."""
        if not conn.scheduled:
            conn.scheduled = True
            heapq.heappush(self.ready, (len(conn.reads), next(self.order), conn))
        self.start()

    def start(self) -> None:
        while self.running < READS_AT_ONCE and self.ready:
            conn = heapq.heappop(self.ready)[2]
            conn.scheduled = False
            if conn.start_read():
                self.running += 1
                if conn.reads:
                    self.offer(conn)

    def done(self, _task: asyncio.Future[Any]) -> None:
        self.running -= 1
        self.start()


class Clients:
    """The served connections and what they share."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.connections: set[Connection] = set()
        self.memory = FrameMemory(ctx.config.frame_memory)
        self.reads = Reads()
        self.last_refusal_log = -REFUSAL_LOG_INTERVAL

    def refusal(self, peer: Peer, now: float) -> tuple[ErrorCode, str] | None:
        """Why a new connection from `peer` is refused, if it is."""
        if peer.uid != os.getuid():
            log.warning("refused pid %d of uid %d", peer.pid, peer.uid)
            return ErrorCode.FORBIDDEN, "this daemon serves only its own user"
        if self.full(now):
            return ErrorCode.UNAVAILABLE, (
                f"runnerd serves at most {self.ctx.config.max_connections} connections at "
                "once (max_connections); try again later"
            )
        return None

    def forget(self, conn: Connection) -> None:
        """A connection closed: it counts no more, and waits for no frame memory."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.ctx.connections -= 1
        if conn.wanted:
            self.memory.waiting.remove(conn)
            conn.wanted = 0

    def full(self, now: float) -> bool:
        """True when a new connection must be refused (logged at most every 10 s)."""
        if len(self.connections) < self.ctx.config.max_connections:
            return False
        if now - self.last_refusal_log >= REFUSAL_LOG_INTERVAL:
            self.last_refusal_log = now
            log.warning(
                "refusing connections: %d are open (max_connections)", len(self.connections)
            )
        return True

    def sweep(self, now: float) -> None:
        for conn in list(self.connections):
            conn.check_timeouts(now)


def greeting(cfg: Config) -> dict[str, Any]:
    """The reply to `hello`: who answers, and the limits a client must keep."""
    return {
        "daemon": f"runnerd/{__version__}",
        "version": __version__,
        "v": PROTOCOL_VERSION,
        "max_frame": cfg.max_frame,
        "pid": os.getpid(),
        "limits": {
            "max_frame": cfg.max_frame,
            "max_items": MAX_ITEMS,
            "max_depth": MAX_DEPTH,
            "max_connections": cfg.max_connections,
            "max_inflight": cfg.max_inflight,
            "frame_memory": cfg.frame_memory,
            "frame_timeout": cfg.frame_timeout,
            "idle_timeout": cfg.idle_timeout,
        },
    }
