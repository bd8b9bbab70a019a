"""Where a reporter's events go while the daemon is away, and how they come back.

Once the daemon is lost (away, silent for `ACK_WAIT`, or gone with events unacknowledged)
every event goes to the spool on disk, in order; its caller is told once it is durable
(one fsync for all the events spooled since the last one). A background thread reconnects
with exponential backoff and jitter and replays the spool; when the spool is empty the
reporter switches back to the daemon, under its lock, so that no later event overtakes a
spooled one. Idempotency keys (and heartbeat sequence numbers) make the replay
exactly-once.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from runnerd_client.connection import Connection, DaemonUnavailable, Reply
from runnerd_client.protocol import ErrorCode, Request
from runnerd_client.spool import Spool


def _seconds_from_env(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if 0 < value < float("inf") else default


log = logging.getLogger("runnerd_client")
ACK_WAIT = _seconds_from_env("RUNNERD_ACK_WAIT", 1.0)
"""How long the daemon may stay silent with events unacknowledged before they are spooled;
also the longest a call waiting for its answer waits (twice, at worst, with the spool)."""
SPOOLED: dict[str, Any] = {"ok": True, "spooled": True}
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 5.0


class SpoolFallback:
    """A reporter's spool and its mode: while `active`, events are kept on disk.

    It shares the reporter's lock, through the condition `wake`: events are spooled, and
    the switch back to the daemon (`go_live`, given the new connection) made, under it.
    """

    def __init__(
        self,
        spool: Spool,
        wake: threading.Condition,
        connect: Callable[[float], Connection],
        go_live: Callable[[Connection], None],
    ) -> None:
        self.spool = spool
        self.active = False
        self._wake = wake
        self._connect = connect
        self._go_live = go_live
        self._pid = os.getpid()
        self._replaying = threading.Lock()
        self._unsynced: list[Future[Reply]] = []
        self._warned = False
        self._failed = False

    @property
    def unsynced(self) -> bool:
        """Whether events were spooled whose callers wait for them to be durable."""
        return bool(self._unsynced)

    def start(self, reason: str) -> None:
        """Under the lock: spool every event from now on (say why, once) and start the
        thread that reconnects and replays."""
        if self.active:
            return
        self.active = True
        if not self._warned:
            self._warned = True
            log.warning("%s; recording events in %s until it is back", reason, self.spool.path)
        threading.Thread(target=self._reconnect_loop, name="runnerd-reconnect", daemon=True).start()

    def keep(self, req: Request, future: Future[Reply]) -> None:
        """Under the lock: spool an event (its future resolves once it is on disk); if even
        the disk refuses it, say so once and let the run go on."""
        try:
            self.spool.append(req)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.error(
                    "cannot spool to %s (%s): events are being lost",
                    ", ".join(map(str, self.spool.folders)),
                    exc,
                )
            future.set_result(
                {
                    "ok": False,
                    "error": {"code": ErrorCode.UNAVAILABLE, "message": f"not spooled: {exc}"},
                }
            )
            return
        self._unsynced.append(future)
        self._wake.notify_all()

    def flush(self) -> None:
        """Make what was spooled survive a machine crash, then tell its callers: one flush
        for every event spooled since the last one."""
        with self._wake:
            futures, self._unsynced = self._unsynced, []
        if not futures:
            return
        self.spool.sync()
        for future in futures:
            if not future.done():
                future.set_result(SPOOLED)

    def _reconnect_loop(self) -> None:
        delay = FIRST_BACKOFF
        while self.active and os.getpid() == self._pid:
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, MAX_BACKOFF)
            try:
                conn = self._connect(ACK_WAIT)
            except DaemonUnavailable:
                continue
            if self.replay(conn, None):
                log.info("runnerd is back; spooled events delivered")
                return

    def replay(self, conn: Connection, deadline: float | None) -> bool:
        """Deliver the spool in order on `conn` and switch to it once the spool is empty;
        False (and `conn` closed) if the daemon went away or fell silent first."""
        with self._replaying:
            cursor = self.spool.start()
            while True:
                with self._wake:
                    if not self.active:
                        conn.close()
                        return True
                    reqs, cursor = self.spool.requests_from(cursor)
                    if not reqs:
                        self.spool.remove()
                        self.active = False
                        self._go_live(conn)
                        return True
                if not _deliver(conn, reqs, deadline):
                    conn.close()
                    return False


def _deliver(conn: Connection, reqs: list[Request], deadline: float | None) -> bool:
    """Send spooled events pipelined; False if the daemon went away, fell silent for
    ACK_WAIT or the deadline passed before it acknowledged them all."""
    for req, future in zip(reqs, conn.send_many(reqs), strict=True):
        while True:
            try:
                reply = future.result(ACK_WAIT / 4)
                break
            except DaemonUnavailable:
                return False
            except TimeoutError:
                now = time.monotonic()
                if now - conn.last_reply > ACK_WAIT or deadline is not None and now > deadline:
                    return False
        error = reply.get("error") or {}
        if error.get("code") == ErrorCode.UNAVAILABLE:
            return False
        if error:
            log.warning(
                "replayed %s refused: %s: %s", req.op, error.get("code"), error.get("message")
            )
    return True
