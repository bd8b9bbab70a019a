"""The per-connection loop: the only code that reads from or writes to a client socket."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Awaitable
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from runnerd import __version__
from runnerd.handlers import HANDLERS, Context, Peer
from runnerd.processes import process_start_time
from runnerd_client.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    RunnerdError,
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


class Connection:
    """Reads frames, hands each request to its handler, writes replies as they complete."""

    def __init__(self, ctx: Context, stream: SocketStream, peer: Peer) -> None:
        self.ctx = ctx
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.peer = peer
        self.greeted = False
        self.outbox: list[bytes] = []
        self.outbox_ready = anyio.Event()
        self.closed = False

    async def serve(self) -> None:
        """Serve until the peer hangs up or breaks the framing."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._send_loop)
            try:
                await self._read_loop(tg)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, ConnectionError):
                pass
            finally:
                self.closed = True
                self.outbox_ready.set()

    async def _read_loop(self, tg: TaskGroup) -> None:
        limit = self.ctx.config.max_frame
        while True:
            (length,) = HEADER.unpack(await self.reader.receive_exactly(HEADER.size))
            if length > limit:
                self._queue(error_reply(
                    None, ErrorCode.TOO_LARGE, f"frame of {length} bytes exceeds {limit}"))
                return
            body = await self.reader.receive_exactly(length)
            if not self._dispatch(tg, body):
                return

    def _dispatch(self, tg: TaskGroup, body: bytes) -> bool:
        """Start handling one frame; False when the connection must close."""
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
            pending = HANDLERS[type(req)](self.ctx, self.peer, req)
        except RunnerdError as exc:
            self._queue(error_reply(req_id, exc.code, exc.message))
            return True
        except Exception as exc:
            log.exception("request %s could not be handled", req_id)
            self._queue(error_reply(req_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return True
        tg.start_soon(self._answer, req_id, pending)
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

    async def _answer(self, req_id: int | None, pending: Awaitable[dict[str, Any]]) -> None:
        try:
            reply = ok_reply(req_id, await pending)
        except RunnerdError as exc:
            reply = error_reply(req_id, exc.code, exc.message)
        except Exception as exc:
            log.exception("request %s failed", req_id)
            reply = error_reply(req_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        self._queue(reply)

    def _queue(self, reply: dict[str, Any]) -> None:
        self.outbox.append(frame(reply))
        self.outbox_ready.set()

    async def _send_loop(self) -> None:
        """Write queued replies, many per system call when they complete together."""
        while True:
            await self.outbox_ready.wait()
            self.outbox_ready = anyio.Event()
            if self.outbox:
                data, self.outbox = b"".join(self.outbox), []
                try:
                    await self.stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                    return
            if self.closed:
                return


async def serve_connection(ctx: Context, stream: SocketStream) -> None:
    """Check the peer's uid, then serve it; a peer of another user gets `forbidden`."""
    async with stream:
        try:
            peer = peer_of(stream.extra(anyio.abc.SocketAttribute.raw_socket))
        except OSError as exc:
            log.warning("could not read peer credentials: %s", exc)
            return
        if peer.uid != os.getuid():
            log.warning("refused pid %d of uid %d", peer.pid, peer.uid)
            await stream.send(frame(error_reply(
                None, ErrorCode.FORBIDDEN, "this daemon serves only its own user")))
            return
        ctx.connections += 1
        try:
            await Connection(ctx, stream, peer).serve()
        finally:
            ctx.connections -= 1
