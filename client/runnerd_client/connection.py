"""A thread-safe synchronous connection to the daemon, shared by a process's threads.

Requests are pipelined: `send` returns a future at once and a reader thread
matches replies to futures by id, so threads never wait for each other's replies.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    Request,
    RunnerdError,
    encode_request,
    raise_for_reply,
    unpack_body,
)

CLIENT_NAME = "runnerd_client/0.1.0"


class DaemonUnavailable(RunnerdError):
    """The daemon cannot be reached (not running, wrong socket, or went away)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


class Connection:
    """One socket to the daemon; `send` from any thread, replies matched by id."""

    def __init__(self, path: str | Path | None = None, *, timeout: float = 5.0,
                 client: str = CLIENT_NAME) -> None:
        self.path = Path(path) if path is not None else paths.socket_path()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailable(f"runnerd is not reachable at {self.path}: "
                                    f"{exc.strerror or exc}") from None
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._closed: RunnerdError | None = None
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read_loop, name="runnerd-reader", daemon=True).start()
        self.hello = self.call(Hello(v=PROTOCOL_VERSION, client=client), timeout=timeout)

    def send(self, req: Request) -> Future[dict[str, Any]]:
        """Send a request; the future holds the raw reply map (ok or error)."""
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._closed is not None:
                future.set_exception(self._closed)
                return future
            req_id = next(self._ids)
            self._pending[req_id] = future
            try:
                self._sock.sendall(encode_request(req_id, req))
            except OSError as exc:
                del self._pending[req_id]
                future.set_exception(DaemonUnavailable(f"lost the daemon: {exc}"))
        return future

    def call(self, req: Request, timeout: float | None = 30.0) -> dict[str, Any]:
        """Send and wait; raise the reply's error as RunnerdError."""
        try:
            return raise_for_reply(self.send(req).result(timeout))
        except TimeoutError:
            raise DaemonUnavailable(f"no reply from runnerd within {timeout} s") from None

    @property
    def alive(self) -> bool:
        return self._closed is None

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _read_loop(self) -> None:
        """Read what the socket holds (up to 256 KiB) and deliver every whole frame in it:
        one recv per burst of replies or events rather than two per frame."""
        error: RunnerdError = DaemonUnavailable("connection to runnerd closed")
        buf, head = bytearray(), HEADER.size
        try:
            while chunk := self._sock.recv(1 << 18):
                buf += chunk
                pos, end = 0, len(buf)
                while end - pos >= head:
                    (length,) = HEADER.unpack_from(buf, pos)
                    if end - pos - head < length:
                        break
                    self._deliver(unpack_body(bytes(buf[pos + head:pos + head + length])))
                    pos += head + length
                del buf[:pos]
        except (OSError, ConnectionError, ValueError):
            pass
        except RunnerdError as exc:
            error = exc
        with self._lock:
            self._closed = error
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(error)

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event after a `Subscribe` (None at the timeout); raises once the
        connection is gone and every event it brought has been taken."""
        try:
            return self._events.get(timeout=timeout if self.alive else 0)
        except queue.Empty:
            if not self.alive:
                raise self._closed or DaemonUnavailable("connection closed") from None
            return None

    def _deliver(self, reply: dict[str, Any]) -> None:
        if "event" in reply and "id" not in reply:
            self._events.put(reply)
            return
        req_id = reply.get("id")
        with self._lock:
            future = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
            if future is None and not reply.get("ok"):
                # An error that names no request (forbidden, too_large) ends the connection.
                error = reply.get("error") or {}
                raise RunnerdError(str(error.get("code")), str(error.get("message")))
        if future is not None:
            future.set_result(reply)
