"""The per-connection loop: the only code that reads from or writes to a client socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from functools import partial
from typing import Any

from runnerd import __version__
from runnerd.events import Subscriber
from runnerd.handlers import HANDLERS, Context, Peer
from runnerd_client.procinfo import start_time as process_start_time
from runnerd_client.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    RunnerdError,
    Subscribe,
    decode_request,
    error_reply,
    frame,
    ok_reply,
    unpack_body,
)

log = logging.getLogger(__name__)
_UCRED = struct.Struct("3i")


def peer_of(sock: socket.socket) -> Peer:
    """The connecting process's pid and uid, from the kernel (SO_PEERCRED)."""
    pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid=pid, uid=uid, start_time=process_start_time(pid))


class FrameProtocol(asyncio.Protocol):
    """One client connection on the event loop: frames in from `data_received`, replies
    out through the transport (which writes at once when the socket can take it).

    No task per connection or per queued mutation: a mutation is answered from its
    future's done callback; only reads (get/list/status) and artifacts run as tasks.
    """

    def __init__(self, ctx: Context, connections: set[FrameProtocol]) -> None:
        self.ctx = ctx
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.greeted = False
        self.closed = False
        self.buffer = bytearray()
        self.subscriber: Subscriber | None = None
        self.tasks: set[asyncio.Future[Any]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        try:
            self.peer = peer_of(transport.get_extra_info("socket"))
        except OSError as exc:
            log.warning("could not read peer credentials: %s", exc)
            self._close()
            return
        if self.peer.uid != os.getuid():
            log.warning("refused pid %d of uid %d", self.peer.pid, self.peer.uid)
            transport.write(frame(error_reply(
                None, ErrorCode.FORBIDDEN, "this daemon serves only its own user")))
            self._close()
            return
        self.connections.add(self)
        self.ctx.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.connections:
            self.connections.discard(self)
            self.ctx.connections -= 1
        self.closed = True
        if self.subscriber is not None:
            self.ctx.broker.unsubscribe(self.subscriber)
        for task in self.tasks:
            task.cancel()

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its requests meanwhile."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if self.subscriber is not None:
                self.subscriber.report_lag()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.peer is None:
            return
        buf = self.buffer
        buf += data
        limit, pos, size = self.ctx.config.max_frame, 0, len(buf)
        while size - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > limit:
                self._queue(error_reply(
                    None, ErrorCode.TOO_LARGE, f"frame of {length} bytes exceeds {limit}"))
                self._close()
                return
            end = pos + HEADER.size + length
            if end > size:
                break
            body = bytes(buf[pos + HEADER.size:end])
            pos = end
            if not self._dispatch(body):
                self._close()
                return
        del buf[:pos]

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes

    def _dispatch(self, body: bytes) -> bool:
        """Start handling one frame; False when the connection must close."""
        assert self.peer is not None
        req_id: int | None = None
        try:
            msg = unpack_body(body)
            if not isinstance(msg, dict):
                raise RunnerdError(ErrorCode.BAD_FRAME, "a frame must hold a msgpack map")
            req_id = msg.get("id") if type(msg.get("id")) is int else None
            req_id, req = decode_request(msg)
            if isinstance(req, Hello):
                return self._hello(req_id, req)
            if not self.greeted:
                raise RunnerdError(ErrorCode.BAD_REQUEST, "the first request must be 'hello'")
            if isinstance(req, Subscribe):
                return self._subscribe(req_id, req)
            pending = HANDLERS[type(req)](self.ctx, self.peer, req)
        except RunnerdError as exc:
            self._queue(error_reply(req_id, exc.code, exc.message))
            return True
        except Exception as exc:
            log.exception("request %s could not be handled", req_id)
            self._queue(error_reply(req_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return True
        if not isinstance(pending, asyncio.Future):
            pending = asyncio.ensure_future(pending)
            self.tasks.add(pending)
            pending.add_done_callback(self.tasks.discard)
        pending.add_done_callback(partial(self._finish, req_id))
        return True

    def _subscribe(self, req_id: int | None, req: Subscribe) -> bool:
        """Turn this connection into an event stream too (it still answers requests)."""
        assert self.transport is not None
        if self.subscriber is not None:
            raise RunnerdError(ErrorCode.BAD_REQUEST, "this connection is already subscribed")
        if req.since is not None and req.since < 0:
            raise RunnerdError(ErrorCode.BAD_REQUEST, "since must be a seq (0 or more)")
        self.subscriber = Subscriber(self._write, self.transport.get_write_buffer_size,
                                     req.run, req.experiment, req.sweep)
        self._queue(ok_reply(req_id, {"subscribed": True}))
        task = asyncio.ensure_future(self.ctx.broker.subscribe(self.subscriber, req.since))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def _hello(self, req_id: int | None, req: Hello) -> bool:
        if req.v != PROTOCOL_VERSION:
            self._queue(error_reply(req_id, ErrorCode.VERSION_MISMATCH,
                                    f"daemon speaks protocol {PROTOCOL_VERSION}, not {req.v}"))
            return False
        self.greeted = True
        self._queue(ok_reply(req_id, {
            "daemon": f"runnerd/{__version__}", "version": __version__, "v": PROTOCOL_VERSION,
            "max_frame": self.ctx.config.max_frame, "pid": os.getpid(),
        }))
        return True

    def _finish(self, req_id: int | None, future: asyncio.Future[dict[str, Any]]) -> None:
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

    def _queue(self, reply: dict[str, Any]) -> None:
        self._write(frame(reply))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def serve_connections(ctx: Context, listening: socket.socket) -> None:
    """Accept and serve clients on `listening` until cancelled; then drop every connection."""
    connections: set[FrameProtocol] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: FrameProtocol(ctx, connections),
                                           sock=listening)
    try:
        await asyncio.Future()  # until the caller's scope is cancelled
    finally:
        server.close()
        for conn in list(connections):
            conn._close()
