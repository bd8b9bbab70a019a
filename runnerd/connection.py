"""A client connection: the only code that reads from or writes to a client socket.

It bounds what one connection costs everyone else (README, "Connection limits"; what the
connections share is in `admission`): at most `max_inflight` requests of a connection are
worked on (`request_loop`), and nothing more is read from it while they are or while its
replies are not read; a frame must arrive whole within `frame_timeout`; an idle
connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Any

from runnerd.admission import Clients, listen_backlog, peer_of, raise_fd_limit
from runnerd.handlers import Context, Peer
from runnerd.request_loop import RequestLoop
from runnerd_client.protocol import HEADER, ErrorCode, error_reply, frame

log = logging.getLogger(__name__)
READ_SIZE = 64 << 10
"""What one read takes; a frame larger than this is read only into reserved memory."""
BIG_READ_SIZE = 256 << 10
_SCRATCH = memoryview(bytearray(BIG_READ_SIZE))  # every read lands here first (one loop)


class FrameProtocol(asyncio.BufferedProtocol):
    """One client connection on the event loop: frames in from `buffer_updated`, handed
    whole to its `RequestLoop`; replies out through the transport (which writes at once
    when the socket can take it)."""

    def __init__(self, ctx: Context, clients: Clients) -> None:
        self.ctx = ctx
        self.clients = clients
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.closed = False
        self.buffer = bytearray()
        self.outgoing: list[bytes] = []  # frames to send at the end of this turn of the loop
        self.outgoing_bytes = 0
        self.requests = RequestLoop(ctx, clients, self)
        self.scheduled = False  # waiting in Reads for its turn
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
        self.requests.drop()

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its requests meanwhile."""
        self.write_paused = True
        self.write_paused_at = self.loop.time()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.requests.subscriber is not None and not self.closed:
            self.requests.subscriber.report_lag()
        self.unblocked()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH[: BIG_READ_SIZE if self.reserved else READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.buffer += _SCRATCH[:nbytes]
        self.last_active = self.loop.time()
        self._process()

    # --- reading ---

    @property
    def reads(self) -> deque[Any]:
        """Its reads waiting for their turn (`admission.Reads`)."""
        return self.requests.reads

    def start_read(self) -> bool:
        return self.requests.start_read()

    def _blocked(self) -> bool:
        """Whether the connection must not be read now (and its buffered frames wait)."""
        return self.write_paused or self.requests.full or self.wanted > 0

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
            if not self.requests.dispatch(body):
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
        self.loop.call_soon(self.unblocked)

    def unblocked(self) -> None:
        self.requests.run_tasks()
        if self.requests.reads:
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
            not self.requests.inflight
            and self.requests.subscriber is None
            and now - self.last_active > cfg.idle_timeout
        ):
            self._refuse(
                ErrorCode.UNAVAILABLE,
                f"closing a connection idle for {cfg.idle_timeout} s (idle_timeout)",
            )

    def _refuse(self, code: ErrorCode, message: str) -> None:
        """Say why (in an error that names no request), then close."""
        self.send(error_reply(None, code, message))
        self.close()

    def close(self) -> None:
        self.closed = True
        self._flush()
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes

    # --- writing ---

    def send(self, reply: dict[str, Any]) -> None:
        self.write(frame(reply))

    def write(self, data: bytes) -> None:
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

    def buffered(self) -> int:
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
