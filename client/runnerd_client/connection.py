"""A thread-safe synchronous connection to the daemon, shared by a process's threads.

Requests are pipelined: `send` returns a future at once and a reader thread
matches replies to futures by id, so threads never wait for each other's replies.
Sending holds only a send lock, which the reader never takes: a sender blocked on
a full socket can never stop the replies that would unblock it from being read.

Nothing is sent before the daemon is known to be this user's: the socket's folder
must be ours and private, and the listening process must run as our uid.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Sequence
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
from runnerd_client.trust import UntrustedPath, check_private_dir

CLIENT_NAME = "runnerd_client/0.1.0"
CONNECT_PATIENCE = 1.0
"""How long a connect retries while the daemon's listen queue is full (EAGAIN)."""
_UCRED = struct.Struct("3i")
_TIMEVAL = struct.Struct("ll")

Reply = dict[str, Any]


class DaemonUnavailable(RunnerdError):
    """The daemon cannot be reached (not running, wrong socket, or went away)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


class UntrustedDaemon(DaemonUnavailable):
    """The socket is not this user's daemon's: its folder or its listener is someone else's."""


def _refuse(sock: socket.socket, message: str) -> UntrustedDaemon:
    sock.close()
    return UntrustedDaemon(message)


def _connect_once(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def open_socket(path: Path, timeout: float) -> socket.socket:
    """A socket connected to our own daemon at `path`, or DaemonUnavailable saying why.

    A full listen queue (EAGAIN, many clients connecting at once) is retried briefly:
    the daemon is there, it is only busy accepting.
    """
    try:
        check_private_dir(path.parent)
    except UntrustedPath as exc:
        raise UntrustedDaemon(f"not connecting to {path}: {exc}") from None
    except OSError as exc:
        raise DaemonUnavailable(
            f"runnerd is not reachable at {path}: {exc.strerror or exc}"
        ) from None
    deadline, delay = time.monotonic() + min(timeout, CONNECT_PATIENCE), 0.005
    while True:
        try:
            sock = _connect_once(path, timeout)
            break
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() > deadline:
                raise DaemonUnavailable(
                    f"runnerd is not reachable at {path}: {exc.strerror or exc}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if uid != os.getuid():
        raise _refuse(
            sock,
            f"not talking to {path}: it is served by uid {uid}, not by this"
            f" user (uid {os.getuid()})",
        )
    return sock


class Connection:
    """One socket to the daemon; `send` from any thread, replies matched by id."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        timeout: float = 5.0,
        client: str = CLIENT_NAME,
        send_timeout: float | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else paths.socket_path()
        self._sock = open_socket(self.path, timeout)
        self._sock.settimeout(None)
        if send_timeout is not None:  # a send the daemon does not take in time ends it
            seconds = int(send_timeout)
            self._sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                _TIMEVAL.pack(seconds, int((send_timeout - seconds) * 1e6)),
            )
        self._owner = os.getpid()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Reply]] = {}
        self._closed: RunnerdError | None = None
        self._events: queue.Queue[Reply] = queue.Queue()
        self.last_reply = time.monotonic()
        """When a frame last came from the daemon (monotonic): a silent daemon is stalled."""
        threading.Thread(target=self._read_loop, name="runnerd-reader", daemon=True).start()
        try:
            self.hello = self.call(Hello(v=PROTOCOL_VERSION, client=client), timeout=timeout)
        except BaseException:
            self.close()
            raise

    def send(self, req: Request) -> Future[Reply]:
        """Send a request; the future holds the raw reply map (ok or error)."""
        return self.send_many([req])[0]

    def send_many(self, reqs: Sequence[Request]) -> list[Future[Reply]]:
        """Send requests in order in one write; one future per request, as `send`."""
        futures: list[Future[Reply]] = [Future() for _ in reqs]
        with self._send_lock:
            with self._lock:
                closed = self._closed
                ids = [] if closed else [next(self._ids) for _ in reqs]
                if closed is None:
                    self._pending.update(zip(ids, futures, strict=True))
            if closed is not None:
                for future in futures:
                    future.set_exception(closed)
                return futures
            data = b"".join(encode_request(i, req) for i, req in zip(ids, reqs, strict=True))
            try:
                self._sock.sendall(data)
            except OSError as exc:  # part of a frame may be out: the stream is unusable
                self._lost(ids, DaemonUnavailable(f"lost the daemon: {exc}"))
                self._shutdown()
        return futures

    def _lost(self, ids: list[int], error: RunnerdError) -> None:
        with self._lock:
            failed = [f for i in ids if (f := self._pending.pop(i, None)) is not None]
        for future in failed:
            if not future.done():
                future.set_exception(error)

    def call(self, req: Request, timeout: float | None = 30.0) -> Reply:
        """Send and wait; raise the reply's error as RunnerdError."""
        try:
            return raise_for_reply(self.send(req).result(timeout))
        except TimeoutError:
            raise DaemonUnavailable(f"no reply from runnerd within {timeout} s") from None

    @property
    def alive(self) -> bool:
        return self._closed is None

    def close(self) -> None:
        """Close the socket; in a forked child only this process's copy of it (a shutdown
        would cut the parent's connection too)."""
        if os.getpid() == self._owner:
            self._shutdown()
        self._sock.close()

    def _shutdown(self) -> None:
        """End the connection for both sides (the reader wakes and fails what is pending)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_loop(self) -> None:
        """Read what the socket holds (up to 256 KiB) and deliver every whole frame in it:
        one recv per burst of replies or events rather than two per frame."""
        error: RunnerdError = DaemonUnavailable("connection to runnerd closed")
        buf, head = bytearray(), HEADER.size
        try:
            while chunk := self._sock.recv(1 << 18):
                self.last_reply = time.monotonic()
                buf += chunk
                pos, end = 0, len(buf)
                while end - pos >= head:
                    (length,) = HEADER.unpack_from(buf, pos)
                    if end - pos - head < length:
                        break
                    self._deliver(unpack_body(bytes(buf[pos + head : pos + head + length])))
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
            if not future.done():
                future.set_exception(error)

    def next_event(self, timeout: float | None = None) -> Reply | None:
        """The next event after a `Subscribe` (None at the timeout); raises once the
        connection is gone and every event it brought has been taken."""
        try:
            return self._events.get(timeout=timeout if self.alive else 0)
        except queue.Empty:
            if not self.alive:
                raise self._closed or DaemonUnavailable("connection closed") from None
            return None

    def _deliver(self, reply: Reply) -> None:
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
        if future is not None and not future.done():
            future.set_result(reply)
