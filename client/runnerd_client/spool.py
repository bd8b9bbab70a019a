"""The on-disk spool: events a client could not deliver, kept in order for replay.

A spool file holds wire frames (length-prefixed msgpack maps) after a header frame
naming the writing process. Its owner holds an exclusive flock on it while it lives,
so a spool whose lock can be taken belongs to a process that is gone: the next
daemon start replays it. A frame cut short by a crash ends the file; nothing after
it was acknowledged to anyone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runnerd_client import paths
from runnerd_client.procinfo import start_time
from runnerd_client.protocol import (
    HEADER,
    Request,
    RunnerdError,
    decode_request,
    frame,
    request_map,
    unpack_body,
)

SPOOL_VERSION = 1
SUFFIX = ".spool"


class Spool:
    """This process's spool file, created on first use and locked while the process lives."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or paths.spool_dir()
        self.path = self.folder / f"{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        self._fd: int | None = None

    def append(self, req: Request) -> None:
        """Add one event; it reaches the kernel before this returns."""
        if self._fd is None:
            self._open()
        assert self._fd is not None
        _append_whole(self._fd, frame(request_map(req)))

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _append_whole(fd, frame({"spool": SPOOL_VERSION, "pid": os.getpid(),
                                     "start_time": start_time(os.getpid()),
                                     "created": time.time()}))
        except OSError:
            os.close(fd)  # a later try opens it afresh (a second flock here would deadlock)
            raise
        self._fd = fd

    def requests_from(self, offset: int) -> tuple[list[Request], int]:
        """The events written at or after byte `offset`, and the offset after them."""
        if self._fd is None:
            return [], offset
        data = self.path.read_bytes()
        found = list(parse(data, offset))
        end = found[-1][1] if found else offset
        return [req for req, _ in found if req is not None], end

    def remove(self) -> None:
        """Delete the drained spool; a later event starts a new file."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _append_whole(fd: int, data: bytes) -> None:
    """Append a frame whole or not at all: a torn frame would hide every later one."""
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
    except OSError:
        os.ftruncate(fd, end)
        raise


def parse(data: bytes, offset: int = 0) -> Iterator[tuple[Request | None, int]]:
    """(request, offset after it) for each whole frame; the header frame yields None."""
    while offset + HEADER.size <= len(data):
        (length,) = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if end > len(data):
            return
        try:
            msg = unpack_body(data[offset + HEADER.size : end])
            req = None if "spool" in msg else decode_request(msg)[1]
        except (RunnerdError, TypeError):
            return
        yield req, end
        offset = end


def read_header(data: bytes) -> dict[str, Any]:
    (length,) = HEADER.unpack_from(data, 0)
    header: dict[str, Any] = unpack_body(data[HEADER.size : HEADER.size + length])
    return header


def claim_orphans(folder: Path | None = None,
                  pid: int | None = None) -> Iterator[tuple[Path, int]]:
    """Spool files whose owner is gone (of process `pid` only, if given), each yielded with
    its lock held (fd) until the next."""
    folder = folder or paths.spool_dir()
    if not folder.is_dir():
        return
    pattern = f"{pid if pid is not None else '*'}-*{SUFFIX}"
    for path in sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield path, fd
        finally:
            os.close(fd)
