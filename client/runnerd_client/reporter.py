"""The events of one process on their way to the daemon, never lost and never in the way.

`Reporter.emit` queues an event and returns at once; a sender thread writes the
queue to the shared connection and keeps every event until the daemon acknowledges
it. If the daemon is away, stops answering for `ACK_WAIT` seconds (frozen, say), or
goes away with events unacknowledged, those events and every later one go to the
spool, which is replayed once the daemon is back (spool_fallback.py). A call that
waits for its answer waits at most `ACK_WAIT` seconds, then finds its event in the
spool. The experiment never sees an exception for the daemon's sake: it sees one
warning.

After a fork the child's copy of every reporter starts afresh (no connection, no
events, an empty spool of its own): the parent's socket and spool stay the parent's.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from runnerd_client import paths
from runnerd_client.connection import Connection, DaemonUnavailable, Reply
from runnerd_client.fields import check_fields
from runnerd_client.protocol import ErrorCode, Request, raise_for_reply
from runnerd_client.spool import Spool
from runnerd_client.spool_fallback import ACK_WAIT, FIRST_BACKOFF, MAX_BACKOFF, SpoolFallback

log = logging.getLogger("runnerd_client")
MAX_PENDING = 50_000
"""Events in memory (queued or unacknowledged) beyond which new ones go to the spool."""
BATCH = 1_000
EXIT_WAIT = 1.0
"""At exit: how long unacknowledged events may wait for their ack, and then how long the
spool may try to reach the daemon, before the process is let go (the spool stays)."""
EXIT_HELLO = 0.25
"""At exit, how long a new connection may wait for the daemon's hello: a daemon that is up
answers in milliseconds, and a frozen one must not hold the exit up (its spool stays)."""


@dataclass(eq=False)
class _Entry:
    """A request on its way: events are spooled if the daemon fails them; reads are not."""

    req: Request
    future: Future[Reply]
    read: bool = False
    sent_at: float = 0.0


_reporters: weakref.WeakSet[Reporter] = weakref.WeakSet()


class Reporter:
    """One process's connection, its unacknowledged events and its spool."""

    def __init__(
        self, socket_path: str | Path | None = None, spool_dirs: list[Path] | None = None
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else paths.socket_path()
        self._spool_dirs = spool_dirs
        self._start_afresh()
        _reporters.add(self)
        atexit.register(self._at_exit)

    def _start_afresh(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._conn: Connection | None = None
        self._fallback = SpoolFallback(
            Spool(self._spool_dirs or paths.spool_dirs(socket=self.socket_path)),
            self._wake,
            self._connect,
            self._go_live,
        )
        self._outbox: deque[tuple[int, _Entry]] = deque()
        self._unacked: dict[int, _Entry] = {}
        self._tokens = itertools.count()
        self._sender: threading.Thread | None = None

    def _forked(self) -> None:
        """In a forked child: drop the parent's connection, events and spool (unsent,
        unlinked, unlocked: they remain the parent's) and start afresh."""
        if self._conn is not None:
            self._conn.close()
        self._fallback.spool.abandon()
        self._start_afresh()

    @property
    def spooling(self) -> bool:
        """True while events go to the spool instead of the daemon."""
        return self._fallback.active

    def emit(self, req: Request) -> Future[Reply]:
        """Queue an event; the future holds the daemon's reply, or SPOOLED once it is safe
        on disk. Never blocks on the daemon. An event without a time gets the time it was
        emitted: replayed from a spool later, it must not look newer than it is."""
        if getattr(req, "at", 0.0) is None:
            req = dataclasses.replace(req, at=time.time())  # type: ignore[call-arg]
        return self._submit(_Entry(req, Future()))

    def ask(self, req: Request, timeout: float = ACK_WAIT) -> Reply | None:
        """A read, behind this process's earlier events on the same connection; None while
        the daemon is away or silent. Reads are never spooled: only worth their answer now."""
        future = self._submit(_Entry(req, Future(), read=True))
        try:
            return future.result(timeout)
        except (DaemonUnavailable, TimeoutError):
            return None

    def _submit(self, entry: _Entry) -> Future[Reply]:
        check_fields(entry.req)  # a wrong argument raises here, at the call, never sent
        with self._lock:
            self._check_silence()
            if self.spooling:
                self._keep(entry)
            else:
                self._outbox.append((next(self._tokens), entry))
                if len(self._outbox) + len(self._unacked) > MAX_PENDING:
                    self._lose(f"more than {MAX_PENDING} events wait for runnerd")
            self._ensure_sender()
            self._wake.notify_all()
        return entry.future

    def wait(
        self,
        future: Future[Reply],
        what: str,
        *,
        raising: tuple[str, ...] = (),
        expected: tuple[str, ...] = (),
    ) -> Reply | None:
        """The reply (SPOOLED when the event is on disk), or None with a warning; a refusal
        whose code is in `raising` is raised instead, for the caller asked for a verdict,
        and one in `expected` is None without a warning. Waits at most about ACK_WAIT for
        the daemon, then spools what it has not acknowledged."""
        reply = self._result(future)
        if reply is None:
            log.warning("%s neither acknowledged nor spooled within %s s", what, ACK_WAIT)
            return None
        if not reply.get("ok"):
            error = reply.get("error") or {}
            if error.get("code") in raising:
                raise_for_reply(reply)
            if error.get("code") in expected:
                return None
            log.warning("runnerd refused %s: %s: %s", what, error.get("code"), error.get("message"))
            return None
        return reply

    def _result(self, future: Future[Reply]) -> Reply | None:
        """The future's reply: waited for while the daemon answers (events ahead of it are
        being acknowledged); once it is silent for ACK_WAIT, what it has not acknowledged is
        spooled, and the reply is SPOOLED. None only if even that does not come."""
        while True:
            try:
                return future.result(ACK_WAIT / 4)
            except TimeoutError:
                with self._lock:
                    self._check_silence()
                    spooled = self.spooling
                if spooled:
                    break
        self._fallback.flush()
        try:
            return future.result(ACK_WAIT)
        except TimeoutError:
            return None

    def drain(self, timeout: float, *, patient: bool = True, hello_wait: float = ACK_WAIT) -> bool:
        """Try, until `timeout`, to have every event acknowledged (those still unanswered at
        the end are spooled) and to deliver the spool; True when nothing is left undelivered.

        An impatient drain gives up as soon as the daemon cannot be reached, or does not
        answer a new connection within `hello_wait`.
        """
        deadline = time.monotonic() + timeout
        self._settle(deadline)
        delay = FIRST_BACKOFF
        while self.spooling and time.monotonic() < deadline:
            try:
                conn = self._connect(min(hello_wait, max(0.1, deadline - time.monotonic())))
            except DaemonUnavailable:
                if not patient:
                    break
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self._fallback.replay(conn, deadline)
        return not self.spooling

    def _settle(self, deadline: float) -> None:
        """Wait until the events in memory are acknowledged, or spool them at `deadline`
        (or sooner, if the daemon falls silent); then flush the spool to disk."""
        with self._lock:
            while (self._unacked or self._outbox) and not self.spooling:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._lose("events runnerd has not acknowledged yet")
                    break
                self._wake.wait(min(remaining, 0.05))
                self._check_silence()
        self._fallback.flush()

    # --- sending ---

    def _ensure_sender(self) -> None:
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(
                target=self._send_loop, name="runnerd-sender", daemon=True
            )
            self._sender.start()

    def _send_loop(self) -> None:
        """Write queued events to the connection (connecting first if need be), and flush
        the spool to disk, until there is nothing to do for a while."""
        while True:
            with self._lock:
                if not self._wait_for_work():
                    self._sender = None
                    return
                batch = self._take_batch()
                conn = self._conn if self._conn is not None and self._conn.alive else None
            self._fallback.flush()
            if batch:
                self._send(batch, conn)

    def _wait_for_work(self) -> bool:
        """Under the lock: wait for events to send or to sync, watching the daemon's silence
        meanwhile; False after a minute idle (a later event starts a new sender)."""
        idle_since = time.monotonic()
        while not (self._outbox and not self.spooling) and not self._fallback.unsynced:
            if not self._unacked and time.monotonic() - idle_since > 60:
                return False
            self._wake.wait(ACK_WAIT / 4 if self._unacked else 5.0)
            self._check_silence()
        return True

    def _take_batch(self) -> list[int]:
        """Under the lock: move the next queued events to the unacknowledged ones (so that
        losing the daemon spools them in order) and return their tokens."""
        if self.spooling:
            return []
        now, tokens = time.monotonic(), list[int]()
        while self._outbox and len(tokens) < BATCH:
            token, entry = self._outbox.popleft()
            entry.sent_at = now
            self._unacked[token] = entry
            tokens.append(token)
        return tokens

    def _send(self, tokens: list[int], conn: Connection | None) -> None:
        if conn is None:
            try:
                conn = self._connect(ACK_WAIT)
            except DaemonUnavailable as exc:
                with self._lock:
                    self._lose(exc.message)
                return
            with self._lock:
                if self.spooling or self._conn is not None and self._conn.alive:
                    conn.close()  # lost meanwhile (the events are spooled), or raced
                    return
                self._conn = conn
        with self._lock:
            live = [(t, self._unacked[t]) for t in tokens if t in self._unacked]
        sent = conn.send_many([entry.req for _, entry in live])
        for (token, _), future in zip(live, sent, strict=True):
            future.add_done_callback(partial(self._answered, token))

    def _connect(self, timeout: float) -> Connection:
        return Connection(self.socket_path, timeout=timeout, send_timeout=ACK_WAIT)

    def _answered(self, token: int, sent: Future[Reply]) -> None:
        error = sent.exception()
        reply = None if error is not None else sent.result()
        with self._lock:
            entry = self._unacked.get(token)
            if entry is None:
                return
            if reply is None or (reply.get("error") or {}).get("code") == ErrorCode.UNAVAILABLE:
                self._lose(f"lost runnerd at {self.socket_path}")
                return
            del self._unacked[token]
            if not self._unacked:
                self._wake.notify_all()
        entry.future.set_result(reply)

    def _check_silence(self) -> None:
        """Under the lock: a daemon silent for ACK_WAIT with events unacknowledged is treated
        as gone (frozen, or its disk stuck): the events go to the spool."""
        if self.spooling or not self._unacked:
            return
        oldest = next(iter(self._unacked.values())).sent_at
        last = self._conn.last_reply if self._conn is not None else 0.0
        if time.monotonic() - max(oldest, last) > ACK_WAIT:
            self._lose(f"runnerd has not answered for {ACK_WAIT} s")

    def _lose(self, reason: str) -> None:
        """Under the lock: spool every unacknowledged and queued event, in order, ahead of
        any later one; reads in flight get DaemonUnavailable."""
        pending = [*self._unacked.values(), *(entry for _, entry in self._outbox)]
        self._unacked.clear()
        self._outbox.clear()
        conn, self._conn = self._conn, None
        self._fallback.start(reason)
        for entry in pending:
            if entry.read:
                entry.future.set_exception(DaemonUnavailable(reason))
            else:
                self._keep(entry)
        if conn is not None:
            conn.close()
        self._wake.notify_all()

    def _keep(self, entry: _Entry) -> None:
        """Under the lock: spool an event; a read is never spooled, only failed."""
        if entry.read:
            entry.future.set_exception(DaemonUnavailable("runnerd is away"))
        else:
            self._fallback.keep(entry.req, entry.future)

    def _go_live(self, conn: Connection) -> None:
        """Under the lock, once the spool is delivered: later events go to `conn`."""
        self._conn = conn
        self._wake.notify_all()

    def _at_exit(self) -> None:
        """Give events in memory a moment to be acknowledged, spool the rest and try once
        to deliver the spool: bounded, so that exiting never hangs on us."""
        if os.getpid() != self._pid:
            return
        self._settle(time.monotonic() + EXIT_WAIT)
        if self.spooling and not self.drain(EXIT_WAIT, patient=False, hello_wait=EXIT_HELLO):
            log.warning(
                "runnerd still away; it will replay %s when it finds it", self._fallback.spool.path
            )


def _after_fork_in_child() -> None:
    for reporter in list(_reporters):
        reporter._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
