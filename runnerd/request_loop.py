"""One connection's requests: decoded, handled and answered, `max_inflight` at most at once.

A mutation is queued on the registry at once (that keeps a connection's mutations in
order) and answered from its future's done callback; `async` handlers (reads,
artifacts) run as tasks, `TASKS_PER_CONNECTION` at a time, and reads take turns with
every other connection's (`admission.Reads`). Frames come in, and replies go out,
through the connection (`connection.FrameProtocol`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import partial
from typing import Any, Protocol

from runnerd.admission import Clients, Connection, greeting
from runnerd.events import Subscriber
from runnerd.handlers import HANDLERS, READS, TASKS, Context, Peer
from runnerd_client.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    LimitExceeded,
    Request,
    RunnerdError,
    Subscribe,
    check_shape,
    decode_request,
    error_reply,
    ok_reply,
    unpack_request,
)

log = logging.getLogger(__name__)
TASKS_PER_CONNECTION = 4
"""Tasks (reads, artifacts, cancel...) of one connection run at once; the rest wait in it."""


class Link(Connection, Protocol):
    """What the request loop needs of its connection (`connection.FrameProtocol`)."""

    peer: Peer | None
    closed: bool
    write_paused: bool
    last_active: float

    def send(self, reply: dict[str, Any]) -> None: ...
    def write(self, data: bytes) -> None: ...
    def buffered(self) -> int: ...
    def unblocked(self) -> None: ...


class RequestLoop:
    """The requests of one connection, from its frames to their replies."""

    def __init__(self, ctx: Context, clients: Clients, link: Link) -> None:
        self.ctx = ctx
        self.clients = clients
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.greeted = False
        self.subscriber: Subscriber | None = None
        self.subscription: asyncio.Future[Any] | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self.queued: deque[tuple[int | None, Request]] = deque()
        self.reads: deque[tuple[int | None, Request]] = deque()
        self.inflight = 0
        self.full = False  # max_inflight reached; reading waits until half are answered

    def dispatch(self, body: bytes) -> bool:
        """Start handling one frame; False when the connection must close."""
        peer = self.link.peer
        assert peer is not None
        req_id: int | None = None
        try:
            msg = unpack_request(body)
            req_id = msg.get("id") if type(msg.get("id")) is int else None
            req_id, req = decode_request(msg)
            check_shape(msg, req_id)
            if isinstance(req, Hello):
                return self._hello(req_id, req)
            if not self.greeted:
                raise RunnerdError(ErrorCode.BAD_REQUEST, "the first request must be 'hello'")
            if isinstance(req, Subscribe):
                return self._subscribe(req_id, req)
            if type(req) in READS:
                self._count_inflight()
                self.reads.append((req_id, req))
                self.clients.reads.offer(self.link)
                return True
            if type(req) in TASKS:
                self._count_inflight()
                self.queued.append((req_id, req))
                self.run_tasks()
                return True
            pending = HANDLERS[type(req)](self.ctx, peer, req)
        except LimitExceeded as exc:
            self.link.send(error_reply(exc.req_id, exc.code, exc.message))
            return True
        except RunnerdError as exc:
            self.link.send(error_reply(req_id, exc.code, exc.message))
            return True
        except Exception as exc:
            log.exception("request %s could not be handled", req_id)
            self.link.send(error_reply(req_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return True
        if not isinstance(pending, asyncio.Future):
            pending = asyncio.ensure_future(pending)
        self._count_inflight()
        pending.add_done_callback(partial(self._finish, req_id))
        return True

    def _count_inflight(self) -> None:
        self.inflight += 1
        if self.inflight >= self.ctx.config.max_inflight:
            self.full = True

    def run_tasks(self) -> None:
        """Start queued handlers while fewer than TASKS_PER_CONNECTION run, and only while
        the client reads its replies."""
        peer = self.link.peer
        while (
            peer is not None
            and self.queued
            and len(self.tasks) < TASKS_PER_CONNECTION
            and not self.link.closed
            and not self.link.write_paused
        ):
            req_id, req = self.queued.popleft()
            task = asyncio.ensure_future(HANDLERS[type(req)](self.ctx, peer, req))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)
            task.add_done_callback(partial(self._finish, req_id))

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        self.run_tasks()

    def start_read(self) -> bool:
        """Start this connection's next read (Reads' turn); False if it may not now."""
        link = self.link
        if link.peer is None or link.closed or link.write_paused or not self.reads:
            return False
        req_id, req = self.reads.popleft()
        task = asyncio.ensure_future(HANDLERS[type(req)](self.ctx, link.peer, req))
        self.tasks.add(task)
        task.add_done_callback(self.clients.reads.done)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(partial(self._finish, req_id))
        return True

    def _subscribe(self, req_id: int | None, req: Subscribe) -> bool:
        """Turn this connection into an event stream too (it still answers requests)."""
        if self.subscriber is not None:
            raise RunnerdError(ErrorCode.BAD_REQUEST, "this connection is already subscribed")
        self.subscriber = Subscriber(
            self.link.write, self.link.buffered, req.run, req.experiment, req.sweep
        )
        self.link.send(ok_reply(req_id, {"subscribed": True}))
        self.subscription = asyncio.ensure_future(
            self.ctx.broker.subscribe(self.subscriber, req.since)
        )
        return True

    def _hello(self, req_id: int | None, req: Hello) -> bool:
        if req.v != PROTOCOL_VERSION:
            self.link.send(
                error_reply(
                    req_id,
                    ErrorCode.VERSION_MISMATCH,
                    f"daemon speaks protocol {PROTOCOL_VERSION}, not {req.v}",
                )
            )
            return False
        self.greeted = True
        self.link.send(ok_reply(req_id, greeting(self.ctx.config)))
        return True

    def _finish(self, req_id: int | None, future: asyncio.Future[dict[str, Any]]) -> None:
        self.inflight -= 1
        if future.cancelled():
            return
        exc = future.exception()  # retrieve it even when the client has gone (BUG-3)
        if self.link.closed:
            return
        if exc is None:
            self.link.send(ok_reply(req_id, future.result()))
        elif isinstance(exc, RunnerdError):
            self.link.send(error_reply(req_id, exc.code, exc.message))
        else:
            log.error("request %s failed", req_id, exc_info=exc)
            self.link.send(error_reply(req_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        self.link.last_active = self.loop.time()
        if self.full and self.inflight <= self.ctx.config.max_inflight // 2:
            self.full = False
            self.link.unblocked()

    def drop(self) -> None:
        """The connection is gone: stop its stream, forget its queued requests and cancel
        those running."""
        if self.subscriber is not None:
            self.ctx.broker.unsubscribe(self.subscriber)
        if self.subscription is not None:
            self.subscription.cancel()
        if self.queued or self.reads or self.tasks:
            peer = self.link.peer
            log.debug(
                "pid %s closed its connection: %d queued requests dropped, %d running cancelled",
                peer.pid if peer else "?",
                len(self.queued) + len(self.reads),
                len(self.tasks),
            )
        self.queued.clear()
        self.reads.clear()
        for task in list(self.tasks):
            task.cancel()
