"""The events of one process on their way to the daemon, never lost and never in the way.

`Reporter.emit` sends an event on the shared connection and keeps it until the
daemon acknowledges it. If the daemon is away, or goes away with events still
unacknowledged, those events and every later one go to an append-only spool file,
in order, and `emit` answers at once. A background thread reconnects with
exponential backoff and jitter and replays the spool; idempotency keys (and
heartbeat sequence numbers) make the replay exactly-once. The experiment never
sees an exception for the daemon's sake: it sees one warning.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import random
import threading
import time
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.connection import Connection, DaemonUnavailable
from runnerd_client.protocol import ErrorCode, Request, raise_for_reply
from runnerd_client.spool import Spool

log = logging.getLogger("runnerd_client")
ACK_TIMEOUT = 30.0
SPOOLED: dict[str, Any] = {"ok": True, "spooled": True}
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 5.0
EXIT_DRAIN_TIMEOUT = 2.0

Reply = dict[str, Any]


class Reporter:
    """One process's connection, its unacknowledged events and its spool."""

    def __init__(self, socket_path: str | Path | None = None,
                 spool_dir: Path | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else paths.socket_path()
        self._lock = threading.RLock()
        self._replaying = threading.Lock()
        self._conn: Connection | None = None
        self._spool = Spool(spool_dir)
        self._spooling = False
        self._unacked: dict[int, tuple[Request, Future[Reply]]] = {}
        self._tokens = itertools.count()
        self._warned = False
        self._spool_failed = False
        atexit.register(self._at_exit)

    @property
    def spooling(self) -> bool:
        """True while events go to the spool instead of the daemon."""
        return self._spooling

    def emit(self, req: Request) -> Future[Reply]:
        """Send an event; the future holds the daemon's reply, or SPOOLED once it is on disk."""
        future: Future[Reply] = Future()
        with self._lock:
            if not self._spooling:
                conn = self._live_connection()
                if conn is not None:
                    token = next(self._tokens)
                    self._unacked[token] = (req, future)
                    conn.send(req).add_done_callback(partial(self._answered, token))
                    return future
            future.set_result(self._keep(req))
        return future

    def ask(self, req: Request, timeout: float = ACK_TIMEOUT) -> Reply | None:
        """A read on the live connection (no new socket); None while the daemon is away.
        Reads are never spooled: they are only worth their answer now."""
        with self._lock:
            conn = None if self._spooling else self._live_connection()
            if conn is None:
                return None
            sent = conn.send(req)
        try:
            reply: Reply = sent.result(timeout)
        except (DaemonUnavailable, TimeoutError):
            return None
        return reply

    def wait(self, future: Future[Reply], what: str, *, raising: tuple[str, ...] = (),
             expected: tuple[str, ...] = ()) -> Reply | None:
        """The reply (SPOOLED when the event is on disk), or None with a warning; a refusal
        whose code is in `raising` is raised instead, for the caller asked for a verdict,
        and one in `expected` is None without a warning."""
        try:
            reply = future.result(ACK_TIMEOUT)
        except TimeoutError:
            log.warning("runnerd did not acknowledge %s within %s s", what, ACK_TIMEOUT)
            return None
        if not reply.get("ok"):
            error = reply.get("error") or {}
            if error.get("code") in raising:
                raise_for_reply(reply)
            if error.get("code") in expected:
                return None
            log.warning("runnerd refused %s: %s: %s", what, error.get("code"),
                        error.get("message"))
            return None
        return reply

    def drain(self, timeout: float, *, patient: bool = True) -> bool:
        """Try, until `timeout`, to deliver the spool; True when nothing is left undelivered.

        An impatient drain gives up as soon as the daemon cannot be reached.
        """
        deadline = time.monotonic() + timeout
        delay = FIRST_BACKOFF
        while self._spooling and time.monotonic() < deadline:
            try:
                conn = Connection(self.socket_path, timeout=max(0.1, deadline - time.monotonic()))
            except DaemonUnavailable:
                if not patient:
                    break
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            if not self._replay(conn):
                conn.close()
        return not self._spooling

    # --- connection state ---

    def _live_connection(self) -> Connection | None:
        """The live connection; the first call connects, and a failure starts spooling."""
        if self._conn is not None and self._conn.alive:
            return self._conn
        try:
            self._conn = Connection(self.socket_path)
        except DaemonUnavailable as exc:
            self._start_spooling(exc.message)
            return None
        return self._conn

    def _answered(self, token: int, sent: Future[Reply]) -> None:
        failed = sent.exception() is not None or \
            (sent.result().get("error") or {}).get("code") == ErrorCode.UNAVAILABLE
        with self._lock:
            entry = self._unacked.get(token)
            if entry is None:
                return
            if failed:
                self._connection_lost()
                return
            del self._unacked[token]
        entry[1].set_result(sent.result())

    def _connection_lost(self) -> None:
        """Spool every unacknowledged event, in the order sent, ahead of any later one."""
        pending = list(self._unacked.values())
        self._unacked.clear()
        self._start_spooling(f"lost runnerd at {self.socket_path}")
        kept = [self._keep(req) for req, _ in pending]
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for (_, future), reply in zip(pending, kept, strict=True):
            future.set_result(reply)

    def _keep(self, req: Request) -> Reply:
        """Spool an event; if even the disk refuses it, say so once and let the run go on."""
        try:
            self._spool.append(req)
        except OSError as exc:
            if not self._spool_failed:
                self._spool_failed = True
                log.error("cannot spool to %s (%s): events are being lost", self._spool.path,
                          exc)
            return {"ok": False, "error": {"code": ErrorCode.UNAVAILABLE,
                                           "message": f"not spooled: {exc}"}}
        return SPOOLED

    def _start_spooling(self, reason: str) -> None:
        if self._spooling:
            return
        self._spooling = True
        if not self._warned:
            self._warned = True
            log.warning("%s; recording events in %s until it is back", reason, self._spool.path)
        threading.Thread(target=self._reconnect_loop, name="runnerd-reconnect",
                         daemon=True).start()

    def _reconnect_loop(self) -> None:
        delay = FIRST_BACKOFF
        while self._spooling:
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, MAX_BACKOFF)
            try:
                conn = Connection(self.socket_path, timeout=2.0)
            except DaemonUnavailable:
                continue
            if self._replay(conn):
                log.info("runnerd is back; spooled events delivered")
                return
            conn.close()

    def _replay(self, conn: Connection) -> bool:
        """Deliver the spool in order on `conn`; switch to live once it is empty."""
        with self._replaying:
            offset = 0
            while True:
                with self._lock:
                    if not self._spooling:
                        return True
                    reqs, end = self._spool.requests_from(offset)
                    if not reqs:
                        self._spool.remove()
                        self._conn, self._spooling = conn, False
                        return True
                if not _deliver(conn, reqs):
                    return False
                offset = end

    def _at_exit(self) -> None:
        if self._spooling and not self.drain(EXIT_DRAIN_TIMEOUT, patient=False):
            log.warning("runnerd still away; it will replay %s when it finds it",
                        self._spool.path)


def _deliver(conn: Connection, reqs: list[Request]) -> bool:
    """Send spooled events pipelined; False if the daemon went away before acking them all."""
    sent = [(req, conn.send(req)) for req in reqs]
    for req, future in sent:
        try:
            reply = future.result(ACK_TIMEOUT)
        except (DaemonUnavailable, TimeoutError):
            return False
        error = reply.get("error") or {}
        if error.get("code") == ErrorCode.UNAVAILABLE:
            return False
        if error:
            log.warning("replayed %s refused: %s: %s", req.op, error.get("code"),
                        error.get("message"))
    return True
