"""The on-disk spool: events a client could not deliver, kept in order for replay.

A spool is one or more segment files, each holding wire frames (length-prefixed
msgpack maps) after a header frame naming the writing process. A segment is
created exclusively, never through a symlink, in a private folder of ours; when a
folder's disk refuses a write (full, say), the next segment goes to the next folder
of `paths.spool_dirs()`. Its owner holds an exclusive flock on each segment while it
lives, so a segment whose lock can be taken belongs to a process that is gone: the
daemon replays it. A frame cut short by a crash ends its file; nothing after it was
acknowledged to anyone. `sync` makes what was appended survive a machine crash.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runnerd_client import paths, trust
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

log = logging.getLogger("runnerd_client")
SPOOL_VERSION = 1
SUFFIX = ".spool"
READ_CHUNK = 1 << 20

Cursor = tuple[int, int]
"""Where a replay stands: (segment number, byte offset in it)."""


@dataclass
class _Segment:
    path: Path
    fd: int


class Spool:
    """This process's spool, created on first use and locked while the process lives."""

    def __init__(self, folders: Sequence[Path] | None = None) -> None:
        self.folders = list(folders) if folders else paths.spool_dirs()
        self._segments: list[_Segment] = []
        self._first = 0
        """The number of the first segment still held (earlier ones were delivered)."""
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The segment being written (or the folder it will go to), for messages."""
        return self._segments[-1].path if self._segments else self.folders[0]

    def append(self, req: Request) -> None:
        """Add one event; it reaches the kernel before this returns (`sync` for the disk).
        A folder that refuses it is left for the next one; OSError when all refuse."""
        data = frame(request_map(req))
        with self._lock:
            if self._segments:
                try:
                    _append_whole(self._segments[-1].fd, data)
                    self._dirty.add(self._segments[-1].fd)
                    return
                except OSError as exc:
                    failed: OSError = exc
                    skip = self._segments[-1].path.parent
            else:
                failed, skip = OSError(errno.ENOENT, "no spool folder"), None
            for folder in self.folders:
                if folder == skip:
                    continue
                try:
                    segment = self._open(folder)
                    _append_whole(segment.fd, data)
                except OSError as exc:
                    failed = exc
                    continue
                self._dirty.add(segment.fd)
                return
            raise failed

    def _open(self, folder: Path) -> _Segment:
        """A new segment in `folder`, created exclusively, locked and its header written."""
        trust.private_dir(folder)
        name = f"{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        with trust.open_folder(folder) as dir_fd:
            fd = trust.create_file(dir_fd, name, mode=0o600, append=True)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                _append_whole(
                    fd,
                    frame(
                        {
                            "spool": SPOOL_VERSION,
                            "pid": os.getpid(),
                            "uid": os.getuid(),
                            "start_time": start_time(os.getpid()),
                            "created": time.time(),
                        }
                    ),
                )
                os.fsync(dir_fd)
            except OSError:
                os.close(fd)
                os.unlink(name, dir_fd=dir_fd)
                raise
        segment = _Segment(folder / name, fd)
        self._segments.append(segment)
        return segment

    def sync(self) -> None:
        """Flush every segment written since the last sync to its disk."""
        with self._lock:  # copies of the descriptors: appends go on while the disk works
            dirty, self._dirty = [os.dup(fd) for fd in self._dirty], set()
        for fd in dirty:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.error("cannot flush the spool to disk: %s", exc)
            finally:
                os.close(fd)

    def start(self) -> Cursor:
        """A cursor at the first spooled event."""
        return (self._first, 0)

    def requests_from(self, cursor: Cursor) -> tuple[list[Request], Cursor]:
        """The next events at or after `cursor` (a chunk of them), and the cursor after."""
        with self._lock:
            number, offset = cursor
            while number - self._first < len(self._segments):
                reqs, end = _read_frames(self._segments[number - self._first].fd, offset)
                if end > offset:
                    return reqs, (number, end)
                number, offset = number + 1, 0
            return [], (number, offset)

    def remove(self) -> None:
        """Delete the delivered spool; a later event starts a new segment."""
        with self._lock:
            for segment in self._segments:
                segment.path.unlink(missing_ok=True)
                os.close(segment.fd)
            self._first += len(self._segments)
            self._segments, self._dirty = [], set()

    def abandon(self) -> None:
        """Forget the segments without touching them: in a forked child they are the
        parent's (its copy of the descriptors is closed; the parent's locks stay held)."""
        for segment in self._segments:
            os.close(segment.fd)
        self._segments, self._dirty = [], set()
        self._lock = threading.Lock()


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


def _read_frames(fd: int, offset: int) -> tuple[list[Request], int]:
    """The whole frames in a chunk read at `offset` (at least one, if one is there), and the
    offset after them."""
    data = os.pread(fd, READ_CHUNK, offset)
    if len(data) >= HEADER.size:
        (length,) = HEADER.unpack_from(data, 0)
        if HEADER.size + length > len(data):
            data = os.pread(fd, HEADER.size + length, offset)
    found = list(parse(data))
    return [req for req, _ in found if req is not None], offset + (found[-1][1] if found else 0)


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


def _trusted_folder(folder: Path) -> bool:
    try:
        trust.check_private_dir(folder)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("not replaying spools in %s: %s", folder, exc)
        return False
    return True


def _open_own(path: Path) -> int | None:
    """A read descriptor on a spool file of ours; None (with a warning) for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("ignoring spool %s: %s", path, exc.strerror or exc)
        return None
    try:
        trust.check_own_file(os.fstat(fd), path)
    except OSError as exc:
        os.close(fd)
        log.warning("ignoring spool %s: %s", path, exc)
        return None
    return fd


def claim_orphans(
    folders: Sequence[Path] | None = None, pid: int | None = None
) -> Iterator[tuple[Path, int]]:
    """Spool segments whose owner is gone (of process `pid` only, if given), oldest first
    across `folders`, each yielded with its lock held (fd) until the next. Folders and files
    another user could have made or changed are ignored with a warning."""
    pattern = f"{pid if pid is not None else '*'}-*{SUFFIX}"
    found: list[tuple[float, Path]] = []
    for folder in folders if folders is not None else paths.spool_dirs():
        if _trusted_folder(folder):
            for path in folder.glob(pattern):
                try:
                    found.append((path.lstat().st_mtime, path))
                except OSError:
                    continue
    for _mtime, path in sorted(found):
        fd = _open_own(path)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield path, fd
        finally:
            os.close(fd)
