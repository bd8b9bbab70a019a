"""The mirror's side of the shared folder: this registry's node folder (`NodeFiles`: node.json
and the segments, appended to and compacted as `runnerd.mirror_format` lays them out), finding
it again after a restart (`candidates`), and the one thread every file operation runs on
(`Disk`), so that a slow, full or vanished shared filesystem only ever blocks that thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from runnerd.mirror_format import (
    NODE_FILE,
    NotMirrored,
    encode_line,
    read_header,
    segment_name,
    segment_number,
)
from runnerd_client.trust import check_own_file, create_file, open_folder, write_atomically

T = TypeVar("T")


class Disk:
    """One daemon thread for every file operation on the shared folder, one at a time. The
    daemon awaits it without blocking, and exits without it if it hangs on a dead server."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self.busy_since: float | None = None
        threading.Thread(target=self._work, name="runnerd-mirror", daemon=True).start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        future: Future[T] = Future()
        self._jobs.put((partial(fn, *args), future))
        return await asyncio.wrap_future(future)

    def _work(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            self.busy_since = time.monotonic()
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the awaiting task
                future.set_exception(exc)
            finally:
                self.busy_since = None


def node_prefix(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", host)[:64] + "-"


def candidates(mirror: Path, host: str, db: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Folders this host's daemon with this registry path wrote before, newest first."""
    if not mirror.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            "the mirror folder does not exist (is the shared filesystem mounted?)",
            str(mirror),
        )
    found = []
    for entry in os.scandir(mirror):
        if (
            entry.name.startswith(node_prefix(host))
            and entry.is_dir(follow_symlinks=False)
            and _ours(entry.stat(follow_symlinks=False))
        ):
            try:
                header = read_header(Path(entry.path))
            except NotMirrored:
                continue
            if header.get("host") == host and header.get("db") == str(db):
                found.append((Path(entry.path), header))
    return sorted(found, key=lambda f: str(f[1].get("started_at")), reverse=True)


def _ours(info: os.stat_result) -> bool:
    """A node folder this user made and nobody else can write to (the shared folder may be
    writable by others: a folder planted there is not carried on)."""
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class NodeFiles:
    """This registry's folder in the mirror; used only on the Disk thread."""

    def __init__(self, folder: Path, base: int, segment: int) -> None:
        self.folder = folder
        self.base = base
        self.segment = segment
        self.base_bytes = self._size(base)
        self.journal = sum(self._size(n) for n in range(base + 1, segment + 1))
        self.torn = _ends_torn(folder / segment_name(segment))
        self._snapshot: tuple[int, str, int] | None = None  # (number, temp name, fd)

    @classmethod
    def create(cls, mirror: Path, host: str) -> NodeFiles:
        if not mirror.is_dir():
            raise FileNotFoundError(
                errno.ENOENT,
                "the mirror folder does not exist (is the shared filesystem mounted?)",
                str(mirror),
            )
        folder = mirror / f"{node_prefix(host)}{secrets.token_hex(4)}"
        folder.mkdir(mode=0o700)
        return cls(folder, base=0, segment=0)  # its first snapshot is segment 1

    @classmethod
    def reopen(cls, folder: Path, header: dict[str, Any]) -> NodeFiles:
        numbers = [
            n
            for name in os.listdir(folder)
            if (n := segment_number(name)) is not None and n >= header["base"]
        ]
        return cls(folder, header["base"], max(numbers, default=header["base"]))

    def _size(self, number: int) -> int:
        try:
            return (self.folder / segment_name(number)).stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, lines: list[bytes], header: dict[str, Any]) -> None:
        """Append the lines to the current segment (fsync'd), then replace node.json."""
        if lines:
            data = b"\n" * self.torn + b"".join(lines)  # end a torn line first
            with open_folder(self.folder) as dir_fd:
                try:
                    _append(dir_fd, segment_name(self.segment), data)
                except TornWrite:
                    self.torn = True
                    raise
            self.torn = False
            self.journal += len(data)
        self.write_header(header)

    def write_header(self, header: dict[str, Any]) -> None:
        """Replace node.json whole, synced with its folder. A node folder that vanished is
        not made anew (create=False): node.json alone would name segments that are not
        there; the write fails, and the mirror says so and retries."""
        data = encode_line(header)
        write_atomically(self.folder, NODE_FILE, data, mode=0o600, create=False, durable=True)

    def begin_snapshot(self) -> None:
        """Start writing every record whole into the next segment, under a temporary name.
        Not `write_atomically`: the snapshot is written a page per refresh, not at once."""
        self.abort_snapshot()
        number = self.segment + 1
        temp = f".{segment_name(number)}.{secrets.token_hex(4)}.partial"
        with open_folder(self.folder) as dir_fd:
            self._snapshot = (number, temp, create_file(dir_fd, temp, mode=0o600))

    def add_to_snapshot(self, lines: list[bytes]) -> None:
        assert self._snapshot is not None
        _write_all(self._snapshot[2], b"".join(lines))

    def finish_snapshot(self, header: dict[str, Any]) -> None:
        """Rename the snapshot into place, name it the base in node.json, drop the older."""
        assert self._snapshot is not None
        number, temp, fd = self._snapshot
        os.fsync(fd)
        with open_folder(self.folder) as dir_fd:
            os.replace(temp, segment_name(number), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.close(fd)
            self._snapshot = None
            old = range(self.base, self.segment + 1)
            self.base = self.segment = number
            self.base_bytes, self.journal = self._size(number), 0
            self.write_header({**header, "base": number})
            for n in old:
                try:
                    os.unlink(segment_name(n), dir_fd=dir_fd)
                except FileNotFoundError:
                    pass

    def abort_snapshot(self) -> None:
        if self._snapshot is None:
            return
        _, temp, fd = self._snapshot
        self._snapshot = None
        os.close(fd)
        try:
            os.unlink(self.folder / temp)
        except OSError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class TornWrite(OSError):
    """A write failed half-way and could not be cut back off: the file ends mid-line."""


def _append(dir_fd: int, name: str, data: bytes) -> None:
    """Append `data` and fsync it. A failed write is cut back off, so that the next append
    never continues half a line (TornWrite if even that failed)."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        info = os.fstat(fd)
        check_own_file(info, name)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, info.st_size)
            except OSError:
                raise TornWrite(exc.errno, exc.strerror, exc.filename) from exc
            raise
    finally:
        os.close(fd)


def _ends_torn(path: Path) -> bool:
    """Whether a segment's last line was cut short (its writer died mid-line)."""
    try:
        with path.open("rb") as file:
            if file.seek(0, os.SEEK_END) == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except FileNotFoundError:
        return False
