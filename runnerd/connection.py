"""The per-connection loop: the only code that reads from or writes to a client socket.

It bounds what one connection costs everyone else (README, "Connection limits"; what the
connections share is in `admission`): at most `max_inflight` requests of a connection are
worked on, and nothing more is read from it while they are or while its replies are not
read; a frame must arrive whole within `frame_timeout`; an idle connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from functools import partial
from typing import Any

from runnerd.admission import Clients, greeting, listen_backlog, peer_of, raise_fd_limit
from runnerd.events import Subscriber
from runnerd.handlers import HANDLERS, READS, TASKS, Context, Peer
from runnerd_client.protocol import (
    HEADER,
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
    frame,
    ok_reply,
    unpack_request,
)

log = logging.getLogger(__name__)
READ_SIZE = 64 << 10
"""What one read takes; a frame larger than this is read only into reserved memory."""
BIG_READ_SIZE = 256 << 10
TASKS_PER_CONNECTION = 4
"""Tasks (reads, artifacts, cancel...) of one connection run at once; the rest wait in it."""
_SCRATCH = memoryview(bytearray(BIG_READ_SIZE))  # every read lands here first (one loop)


class FrameProtocol(asyncio.BufferedProtocol):
    """One client connection on the event loop: frames in from `buffer_updated`, replies
    out through the transport (which writes at once when the socket can take it).

    A mutation is queued on the registry at once (that keeps a connection's mutations in
    order) and answered from its future's done callback; `async` handlers (reads,
    artifacts) run as tasks, `TASKS_PER_CONNECTION` at a time.
    """

    def __init__(self, ctx: Context, clients: Clients) -> None:
        self.ctx = ctx
        self.clients = clients
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.greeted = False
        self.closed = False
        self.buffer = bytearray()
        self.outgoing: list[bytes] = []  # frames to send at the end of this turn of the loop
        self.outgoing_bytes = 0
        self.subscriber: Subscriber | None = None
        self.subscription: asyncio.Future[Any] | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self.queued: deque[tuple[int | None, Request]] = deque()
        self.reads: deque[tuple[int | None, Request]] = deque()
        self.scheduled = False  # waiting in Reads for its turn
        self.inflight = 0
        self.full = False  # max_inflight reached; reading waits until half are answered
        self.write_paused = False
        self.write_paused_at = 0.0
        self.reserved = 0  # frame memory held for the frame being read
        self.wanted = 0  # frame memory waited for
        self.reading = True
        self.frame_started: float | None = None
        self.last_active = self.loop.time()

    # --- transport callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        try:
            self.peer = peer_of(transport.get_extra_info("socket"))
        except OSError as exc:
            log.warning("could not read peer credentials: %s", exc)
            self.close()
            return
        refused = self.clients.refusal(self.peer, self.loop.time())
        if refused is not None:
            self._refuse(*refused)
            return
        self.clients.connections.add(self)
        self.ctx.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.buffer = bytearray()
        self._release()
        self.clients.forget(self)
        if self.subscriber is not None:
            self.ctx.broker.unsubscribe(self.subscriber)
        if self.subscription is not None:
            self.subscription.cancel()
        if self.queued or self.reads or self.tasks:
            log.debug(
                "pid %s closed its connection: %d queued requests dropped, %d running cancelled",
                self.peer.pid if self.peer else "?",
                len(self.queued) + len(self.reads),
                len(self.tasks),
            )
        self.queued.clear()
        self.reads.clear()
        for task in list(self.tasks):
            task.cancel()

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its requests meanwhile."""
        self.write_paused = True
        self.write_paused_at = self.loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.subscriber is not None and not self.closed:
            self.subscriber.report_lag()
        self._unblocked()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH[: BIG_READ_SIZE if self.reserved else READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.buffer += _SCRATCH[:nbytes]
        self.last_active = self.loop.time()
        self._process()

    # --- reading ---

    def _blocked(self) -> bool:
        """Whether the connection must not be read now (and its buffered frames wait)."""
        return self.write_paused or self.full or self.wanted > 0

    def _process(self) -> None:
        """Dispatch every whole frame in the buffer, unless and until the connection is blocked."""
        buf, pos, completed = self.buffer, 0, False
        limit = self.ctx.config.max_frame
        while not self._blocked() and len(buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > limit:
                self._refuse(ErrorCode.TOO_LARGE, f"frame of {length} bytes exceeds {limit}")
                return
            end = pos + HEADER.size + length
            if end > len(buf):
                self._reserve(HEADER.size + length)
                break
            body = bytes(buf[pos + HEADER.size : end])
            pos, completed = end, True
            self._release()
            if not self._dispatch(body):
                self.close()
                return
        del buf[:pos]
        if not buf:
            self.frame_started = None
        elif completed or self.frame_started is None:
            self.frame_started = self.loop.time()
        self._update_reading()

    def _reserve(self, size: int) -> None:
        """A frame larger than one read is read only into memory reserved for it."""
        if size <= READ_SIZE or self.reserved:
            return
        if self.clients.memory.reserve(size):
            self.reserved = size
        else:
            self.wanted = size
            self.clients.memory.waiting.append(self)

    def _release(self) -> None:
        if self.reserved:
            size, self.reserved = self.reserved, 0
            self.clients.memory.release(size)

    def admitted(self) -> None:
        """The frame memory this connection waited for is now reserved for it."""
        self.reserved, self.wanted = self.wanted, 0
        self.loop.call_soon(self._unblocked)

    def _unblocked(self) -> None:
        self._run_tasks()
        if self.reads:
            self.clients.reads.offer(self)
        if self.closed or self._blocked():
            return
        self.frame_started = None  # the frame timeout counts from here, not from the block
        self._process()

    def _update_reading(self) -> None:
        """Pause or resume reading from the socket to match `_blocked`."""
        want = not self._blocked() and not self.closed
        if want == self.reading or self.transport is None or self.transport.is_closing():
            return
        self.reading = want
        if want:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def check_timeouts(self, now: float) -> None:
        """Close a connection stuck mid-frame, idle, or not reading its replies."""
        cfg = self.ctx.config
        if self.write_paused:
            if now - self.write_paused_at > cfg.idle_timeout and self.transport is not None:
                log.info(
                    "closing the connection of pid %s: replies unread for %s s (idle_timeout)",
                    self.peer.pid if self.peer else "?",
                    cfg.idle_timeout,
                )
                self.transport.abort()
        elif self._blocked():
            return  # waiting for us, not for the client
        elif self.frame_started is not None:
            if now - self.frame_started > cfg.frame_timeout:
                self._refuse(
                    ErrorCode.BAD_FRAME,
                    f"no whole frame within {cfg.frame_timeout} s (frame_timeout); closing",
                )
        elif (
            not self.inflight
            and self.subscriber is None
            and now - self.last_active > cfg.idle_timeout
        ):
            self._refuse(
                ErrorCode.UNAVAILABLE,
                f"closing a connection idle for {cfg.idle_timeout} s (idle_timeout)",
            )

    def _refuse(self, code: ErrorCode, message: str) -> None:
        """Say why (in an error that names no request), then close."""
        self._queue(error_reply(None, code, message))
        self.close()

    def close(self) -> None:
        self.closed = True
        self._flush()
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes

    # --- requests ---

    def _dispatch(self, body: bytes) -> bool:
        """Start handling one frame; False when the connection must close."""
        assert self.peer is not None
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
                self.clients.reads.offer(self)
                return True
            if type(req) in TASKS:
                self._count_inflight()
                self.queued.append((req_id, req))
                self._run_tasks()
                return True
            pending = HANDLERS[type(req)](self.ctx, self.peer, req)
        except LimitExceeded as exc:
            self._queue(error_reply(exc.req_id, exc.code, exc.message))
            return True
        except RunnerdError as exc:
            self._queue(error_reply(req_id, exc.code, exc.message))
            return True
        except Exception as exc:
            log.exception("request %s could not be handled", req_id)
            self._queue(error_reply(req_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
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

    def _run_tasks(self) -> None:
        """Start queued handlers while fewer than TASKS_PER_CONNECTION run, and only while
        the client reads its replies."""
        peer = self.peer
        while (
            peer is not None
            and self.queued
            and len(self.tasks) < TASKS_PER_CONNECTION
            and not self.closed
            and not self.write_paused
        ):
            req_id, req = self.queued.popleft()
            task = asyncio.ensure_future(HANDLERS[type(req)](self.ctx, peer, req))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)
            task.add_done_callback(partial(self._finish, req_id))

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        self._run_tasks()

    def start_read(self) -> bool:
        """Start this connection's next read (Reads' turn); False if it may not now."""
        if self.peer is None or self.closed or self.write_paused or not self.reads:
            return False
        req_id, req = self.reads.popleft()
        task = asyncio.ensure_future(HANDLERS[type(req)](self.ctx, self.peer, req))
        self.tasks.add(task)
        task.add_done_callback(self.clients.reads.done)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(partial(self._finish, req_id))
        return True

    def _subscribe(self, req_id: int | None, req: Subscribe) -> bool:
        """Turn this connection into an event stream too (it still answers requests)."""
        assert self.transport is not None
        if self.subscriber is not None:
            raise RunnerdError(ErrorCode.BAD_REQUEST, "this connection is already subscribed")
        self.subscriber = Subscriber(
            self._write, self._buffered, req.run, req.experiment, req.sweep
        )
        self._queue(ok_reply(req_id, {"subscribed": True}))
        self.subscription = asyncio.ensure_future(
            self.ctx.broker.subscribe(self.subscriber, req.since)
        )
        return True

    def _hello(self, req_id: int | None, req: Hello) -> bool:
        if req.v != PROTOCOL_VERSION:
            self._queue(
                error_reply(
                    req_id,
                    ErrorCode.VERSION_MISMATCH,
                    f"daemon speaks protocol {PROTOCOL_VERSION}, not {req.v}",
                )
            )
            return False
        self.greeted = True
        self._queue(ok_reply(req_id, greeting(self.ctx.config)))
        return True

    def _finish(self, req_id: int | None, future: asyncio.Future[dict[str, Any]]) -> None:
        self.inflight -= 1
        if future.cancelled():
            return
        exc = future.exception()  # retrieve it even when the client has gone (BUG-3)
        if self.closed:
            return
        if exc is None:
            self._queue(ok_reply(req_id, future.result()))
        elif isinstance(exc, RunnerdError):
            self._queue(error_reply(req_id, exc.code, exc.message))
        else:
            log.error("request %s failed", req_id, exc_info=exc)
            self._queue(error_reply(req_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        self.last_active = self.loop.time()
        if self.full and self.inflight <= self.ctx.config.max_inflight // 2:
            self.full = False
            self._unblocked()

    def _queue(self, reply: dict[str, Any]) -> None:
        self._write(frame(reply))

    def _write(self, data: bytes) -> None:
        """Send `data` with everything else this turn of the loop answers: a batch's replies
        go out in one send, not one each (the system call costs more than the frames)."""
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        self.outgoing.append(data)
        self.outgoing_bytes += len(data)

    def _flush(self) -> None:
        out, self.outgoing, self.outgoing_bytes = self.outgoing, [], 0
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def _buffered(self) -> int:
        """Bytes written and not yet sent, as a subscriber's lag counts them."""
        sent_later = self.transport.get_write_buffer_size() if self.transport else 0
        return sent_later + self.outgoing_bytes


async def serve_connections(ctx: Context, listening: socket.socket) -> None:
    """Accept and serve clients on `listening` until cancelled; then drop every connection.
    Meanwhile, close the connections whose time is up."""
    clients = Clients(ctx)
    loop = asyncio.get_running_loop()
    raise_fd_limit(ctx.config.max_connections)
    server = await loop.create_unix_server(
        lambda: FrameProtocol(ctx, clients), sock=listening, backlog=listen_backlog()
    )
    interval = min(ctx.config.frame_timeout, ctx.config.idle_timeout) / 4
    try:
        while True:  # until the caller's scope is cancelled
            await asyncio.sleep(interval)
            clients.sweep(loop.time())
    finally:
        server.close()
        for conn in list(clients.connections):
            conn.close()
