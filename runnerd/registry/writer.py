"""The registry's async face: group-committed mutations on one connection, reads on another.

One thread owns the writing connection. Mutations are queued and applied in batches
inside one transaction (a savepoint per operation), and every caller is answered only
once its batch is committed: with `synchronous=FULL` that means the event survives a
power cut, at the price of one fsync per batch, not per event. Reads have a connection
and a thread of their own: in WAL mode they see the last commit and wait for no writer,
so a write waiting for a lock another process holds delays no read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from runnerd.mounts import read_mountinfo
from runnerd.registry import opening
from runnerd.registry.effects import BatchResult
from runnerd.registry.opening import StorageError
from runnerd.registry.store import Store
from runnerd_client.protocol import ErrorCode, RunnerdError

log = logging.getLogger(__name__)
T = TypeVar("T")
Op = Callable[[Store], Any]
RETRY_FIRST, RETRY_MAX = 0.1, 5.0


class _Worker:
    """One SQLite connection and the one thread that uses it; each call is one hop: the
    thread answers the loop's own future (no executor future chained to it)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[[], Any]] | None]
        self._calls = queue.SimpleQueue()
        self._turn = asyncio.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self.conn: sqlite3.Connection | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the thread. Calls wait their turn here, not in the thread's queue, so
        one cancelled before its turn (its client gone) never runs."""
        async with self._turn:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._calls.put((future, partial(fn, *args)))
            return await future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            try:
                outcome: tuple[bool, Any] = (True, fn())
            except BaseException as exc:
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                future.get_loop().call_soon_threadsafe(_answer, future, *outcome)

    async def close(self) -> None:
        if self.conn is not None:
            await self.call(self.conn.close)
            self.conn = None
        self._calls.put(None)


def _answer(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # cancelled while the thread ran it
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Registry:
    """Mutations queued with `submit` (or `land`), applied in batches by `run_writer`;
    reads with `read`. Subscribers get each batch's result once it is committed."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        max_batch: int = 512,
        busy_timeout_ms: int = 5000,
        mountinfo: Callable[[], str] = read_mountinfo,
    ) -> None:
        self.path = path
        self.mountinfo = mountinfo
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.busy_timeout_ms = busy_timeout_ms
        self._writer: _Worker | None = None
        self._reader: _Worker | None = None
        self._store: Store | None = None
        self._read_store: Store | None = None
        self._queue: list[tuple[Op, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._landing: set[asyncio.Task[Any]] = set()
        self.drained = asyncio.Event()
        self.subscribers: list[Callable[[BatchResult], None]] = []

    async def open(self) -> None:
        """Open (creating if needed, 0600) the database, check it and run pending migrations;
        a registry that is locked, damaged or emptied is refused, saying what to do."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        opening.refuse_network_filesystem(self.path, self.mountinfo())
        created = opening.create_or_check_file(self.path)
        writer, reader = _Worker("runnerd-db-write"), _Worker("runnerd-db-read")
        try:
            writer.conn = await writer.call(opening.connect, self.path, self.busy_timeout_ms)
            await writer.call(opening.prepare, writer.conn, created, self.synchronous)
            reader.conn = await reader.call(opening.connect, self.path, self.busy_timeout_ms)
            await reader.call(reader.conn.execute, "PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            await reader.close()
            await writer.close()
            raise RunnerdError(
                ErrorCode.UNAVAILABLE, opening.refusal(self.path, exc, self.busy_timeout_ms)
            ) from exc
        self._writer, self._reader = writer, reader
        self._store, self._read_store = Store(writer.conn), Store(reader.conn)

    def submit(self, op: Op) -> asyncio.Future[Any]:
        """Queue a mutation; the future resolves once its batch is durable."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(RunnerdError(ErrorCode.UNAVAILABLE, "daemon is shutting down"))
            return future
        self._queue.append((op, future))
        self._wakeup.set()
        return future

    async def land(self, op: Callable[[Store], T], what: str) -> T:
        """Apply a change the daemon made itself (a death judged, a deadline passed): no
        client will retry it, so a storage failure is retried here, with backoff, until it
        lands; only a daemon that stops gives up (its restart judges again from the record)."""
        delay, failures = RETRY_FIRST, 0
        while True:
            try:
                result: T = await self.submit(op)
            except StorageError as exc:
                if self._closing:
                    raise
                failures += 1
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "%s failed: %s; retrying in %.1f s until it lands",
                    what,
                    exc.message,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failures:
                log.info("%s landed after %d failed attempts", what, failures)
            return result

    def submit_quietly(self, op: Op, what: str) -> None:
        """`land` a change nobody waits for; a failure other than storage is logged."""

        async def landed() -> None:
            try:
                await self.land(op, what)
            except Exception as exc:
                log.warning("%s failed: %s", what, exc)

        task = asyncio.get_running_loop().create_task(landed())
        self._landing.add(task)
        task.add_done_callback(self._landing.discard)

    async def read(self, op: Callable[[Store], T]) -> T:
        """Run a read-only function on the reading connection's thread."""
        reader, store = self._require_open(self._reader, self._read_store)
        try:
            result: T = await reader.call(op, store)
        except sqlite3.Error as exc:
            raise RunnerdError(ErrorCode.UNAVAILABLE, f"registry read failed: {exc}") from exc
        return result

    async def run_writer(self) -> None:
        """Apply queued mutations in batches until `stop` is called and the queue is empty."""
        writer, store = self._require_open(self._writer, self._store)
        while True:
            if not self._queue:
                if self._closing:
                    self.drained.set()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                result = await writer.call(self._apply, store, [op for op, _ in batch])
            except Exception as exc:
                log.exception("registry writer failed")
                error = RunnerdError(ErrorCode.UNAVAILABLE, f"registry write failed: {exc}")
                result = BatchResult([(False, error)] * len(batch))
            for (_, future), (ok, value) in zip(batch, result.outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            for subscriber in self.subscribers:
                subscriber(result)

    def _apply(self, store: Store, ops: list[Op]) -> BatchResult:
        """Run a batch in one transaction; one savepoint per op isolates its failure."""
        conn = store.conn
        store.effects.take()
        outcomes: list[tuple[bool, Any]] = []
        try:
            if conn.in_transaction:  # left open by a rollback that failed last time
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                outcomes.append(self._apply_one(store, op))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as again:
                    log.error("rollback failed (tried again before the next batch): %s", again)
            log.error("batch of %d mutations not committed: %s", len(ops), exc)
            return BatchResult([(False, opening.write_error(exc))] * len(ops))
        return store.committed(outcomes)

    @staticmethod
    def _apply_one(store: Store, op: Op) -> tuple[bool, Any]:
        conn = store.conn
        mark = store.effects.mark()
        conn.execute("SAVEPOINT op")
        try:
            value = op(store)
        except sqlite3.OperationalError:
            raise  # the database itself failed (full, locked): the whole batch is off
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            store.effects.rollback(mark)
            if isinstance(exc, RunnerdError):
                return False, exc
            log.exception("mutation failed")
            return False, RunnerdError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        conn.execute("RELEASE op")
        return True, value

    def stop(self) -> None:
        """Take no new mutations; the writer applies those queued, then sets `drained`."""
        self._closing = True
        self._wakeup.set()

    async def close_db(self) -> None:
        """Close the reading connection, then the writing one (the last to close folds the
        WAL into the database and removes it)."""
        for worker in (self._reader, self._writer):
            if worker is not None:
                await worker.close()
        self._reader = self._writer = None

    @staticmethod
    def _require_open(worker: _Worker | None, store: Store | None) -> tuple[_Worker, Store]:
        if worker is None or store is None:
            raise RunnerdError(ErrorCode.UNAVAILABLE, "registry is not open")
        return worker, store
