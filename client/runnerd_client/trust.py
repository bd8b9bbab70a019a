"""What this user may trust on disk: folders and files of their own that nobody else can write.

Every folder runnerd keeps state in (registry, runtime, spool) must be owned by the user and
writable by nobody else, and so must every folder above it, unless it is sticky (like /tmp)
or root's. Run folders and watched folders must be the user's and not world-writable.
Files are created inside a folder opened once (by descriptor), with O_NOFOLLOW and O_EXCL,
so a symlink planted in a folder is never followed.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_TRUSTED_OWNERS = (0,)


class UntrustedPath(PermissionError):
    """A folder or file that someone other than this user could have made or changed."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(errno.EACCES, f"refusing {os.fspath(path)}: {why}")
        self.path = os.fspath(path)
        self.why = why

    def __str__(self) -> str:
        return str(self.strerror)


def _owner_problem(info: os.stat_result, *, root_ok: bool) -> str | None:
    uid = os.getuid()
    if info.st_uid == uid or (root_ok and info.st_uid in _TRUSTED_OWNERS):
        return None
    return f"it belongs to uid {info.st_uid}, not to this user (uid {uid})"


def _ancestors(folder: str) -> Iterator[str]:
    """`folder`'s parents, from the nearest up to /."""
    current = os.path.dirname(folder)
    while True:
        yield current
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _check_chain(path: str) -> None:
    """Every folder above `path`, symlinks included, is ours or root's, and one that others
    may write to is sticky (so they cannot replace what is ours inside it)."""
    for folder in _ancestors(path):
        info = os.lstat(folder)
        problem = _owner_problem(info, root_ok=True)
        if (
            problem is None
            and stat.S_ISDIR(info.st_mode)
            and info.st_mode & _WRITABLE_BY_OTHERS
            and not info.st_mode & stat.S_ISVTX
        ):
            problem = "others may write to it, and it is not sticky"
        if problem is not None:
            raise UntrustedPath(path, f"{folder} is above it and {problem}")


def check_private_dir(path: str | os.PathLike[str]) -> None:
    """Refuse (UntrustedPath) a folder for runnerd's own state that another user could
    change: not ours, writable by group or others, or below a folder that is not safe."""
    text = os.path.abspath(os.fspath(path))
    info = os.lstat(text)
    if stat.S_ISLNK(info.st_mode):
        problem = _owner_problem(info, root_ok=True)
        if problem is not None:
            raise UntrustedPath(text, f"it is a symlink and {problem}")
        _check_chain(text)
        check_private_dir(os.path.realpath(text))
        return
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedPath(text, "it is not a folder")
    problem = _owner_problem(info, root_ok=False)
    if problem is None and info.st_mode & _WRITABLE_BY_OTHERS:
        problem = f"others may write to it (mode {stat.S_IMODE(info.st_mode):04o})"
    if problem is not None:
        raise UntrustedPath(text, problem)
    _check_chain(os.path.realpath(text))


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make `path` (0700, with its parents) if it is missing, then check it as above."""
    folder = Path(os.path.abspath(os.fspath(path)))
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private_dir(folder)
    return folder


def check_own_folder(info: os.stat_result, path: str | os.PathLike[str]) -> None:
    """Refuse a run or watched folder that is not ours or that anyone may write to."""
    problem = _owner_problem(info, root_ok=False)
    if problem is None and info.st_mode & stat.S_IWOTH:
        problem = f"anyone may write to it (mode {stat.S_IMODE(info.st_mode):04o})"
    if problem is not None:
        raise UntrustedPath(path, problem)


def check_own_file(info: os.stat_result, path: str | os.PathLike[str]) -> None:
    """Refuse a file to read that is not a regular file of ours."""
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedPath(path, "it is not a regular file")
    problem = _owner_problem(info, root_ok=False)
    if problem is not None:
        raise UntrustedPath(path, problem)


@contextmanager
def open_folder(path: str | os.PathLike[str], *, create: bool = False) -> Iterator[int]:
    """A descriptor of one of our folders (checked by `check_own_folder`), to create files
    in with `create_file`: what is checked is what is written to."""
    if create:
        Path(path).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        check_own_folder(os.fstat(fd), path)
        yield fd
    finally:
        os.close(fd)


def create_file(
    folder_fd: int, name: str, *, mode: int = 0o644, exclusive: bool = True, append: bool = False
) -> int:
    """Open `name` inside the folder for reading and writing, never through a symlink; with
    `exclusive` it must not exist yet, else an existing file is truncated (or appended to)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(name, flags, mode, dir_fd=folder_fd)
    try:
        check_own_file(os.fstat(fd), name)
    except UntrustedPath:
        os.close(fd)
        raise
    return fd


def write_atomically(
    folder: str | os.PathLike[str],
    name: str,
    data: bytes,
    *,
    mode: int = 0o644,
    create: bool = True,
    durable: bool = False,
) -> None:
    """Replace folder/name with `data`: readers see the old or the new file, and nothing
    planted in the folder (a symlink at the temporary name, say) is written through. With
    `durable`, the file and the folder are synced, so the new file survives a crash."""
    with open_folder(folder, create=create) as dir_fd:
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = create_file(dir_fd, tmp, mode=mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        if durable:
            os.fsync(dir_fd)
