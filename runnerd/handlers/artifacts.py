"""Artifacts and checkpoints: files hashed and recorded against a run, and the checkpoints
a resumed attempt starts from."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor

from runnerd.config import ARTIFACT_TIMEOUT
from runnerd.handlers.common import as_json, bad, mutate
from runnerd.handlers.context import Context, Peer, Reply
from runnerd.registry import Store
from runnerd_client.protocol import Artifact, Checkpoint, ErrorCode, RunnerdError

# Hashing has threads of its own, few: it is bound by the disk, and artifacts hashed at once
# must leave the loop's worker threads (and every other request) free.
HASH_WORKERS = 4
_hashing = ThreadPoolExecutor(max_workers=HASH_WORKERS, thread_name_prefix="runnerd-hash")
HASH_CHUNK = 1 << 20
# Kernel interfaces: their files may read forever (/proc/self/pagemap) or change as read.
KERNEL_TREES = ("/proc", "/sys")


def file_digest(path: str, timeout: float = ARTIFACT_TIMEOUT) -> tuple[int, str]:
    """Size and sha256 of a regular file, read within `timeout` seconds. Anything else is a
    clear error: a folder, device, FIFO or socket (refused before it is opened), a file
    under /proc or /sys (checked on the path with every symlink resolved, before any stat
    there), a file that changes while it is read, one too slow to read."""
    real = os.path.realpath(path)
    for tree in KERNEL_TREES:
        if real == tree or real.startswith(f"{tree}/"):
            raise bad(f"artifact {path} is under {tree}, a kernel interface, not a file")
    try:
        info = os.stat(real)
        _require_regular(path, info)
        # O_NONBLOCK: a FIFO swapped in since the stat must not wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as fh:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                raise bad(f"artifact {path} changed while it was opened")
            digest = _sha256(fh, opened.st_size, path, timeout)
            after = os.fstat(fd)
    except FileNotFoundError:
        raise bad(f"artifact {path} does not exist") from None
    except OSError as exc:
        raise bad(f"artifact {path} cannot be read: {exc.strerror}") from None
    if (after.st_size, after.st_mtime_ns) != (opened.st_size, opened.st_mtime_ns):
        raise bad(
            f"artifact {path} changed while it was hashed ({opened.st_size} bytes, then "
            f"{after.st_size}): register it once it is complete"
        )
    return opened.st_size, digest


FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in FILE_KINDS if test(info.st_mode)), "special")
        raise bad(f"artifact {path} is {kind}, not a regular file")


def _sha256(fh: io.FileIO, size: int, path: str, timeout: float) -> str:
    """The sha256 of the first `size` bytes (what the file held when opened: one that grows
    is caught afterwards, never read forever), given up after `timeout` seconds."""
    digest = hashlib.sha256()
    deadline = time.monotonic() + timeout
    buffer = memoryview(bytearray(HASH_CHUNK))
    left = size
    while left > 0:
        n = fh.readinto(buffer[: min(HASH_CHUNK, left)])
        if not n:
            break  # it shrank: the size check afterwards says so
        digest.update(buffer[:n])
        left -= n
        if time.monotonic() > deadline:
            raise RunnerdError(
                ErrorCode.TOO_LARGE,
                (
                    f"artifact {path} could not be hashed within {timeout:g} s (artifact_timeout): "
                    f"{size - left} of {size} bytes read. Register a smaller file, or raise "
                    "artifact_timeout in config.toml"
                ),
            )
    return digest.hexdigest()


async def handle_artifact(ctx: Context, peer: Peer, req: Artifact) -> Reply:
    return await hash_and_record(ctx, req)


async def hash_and_record(ctx: Context, req: Artifact) -> Reply:
    """Hash the file on the hashing threads (bounded, timed out), then record it."""
    digest = await asyncio.get_running_loop().run_in_executor(
        _hashing, file_digest, req.path, ctx.config.artifact_timeout
    )
    return await record_artifact(ctx, req, digest)


def record_artifact(ctx: Context, req: Artifact, digest: tuple[int, str]) -> Awaitable[Reply]:
    """Queue the record of an artifact whose size and sha256 are known."""
    size, sha256 = digest
    path = os.path.normpath(req.path)

    def apply(store: Store, at: float) -> Reply:
        store.runs.require(req.run_id)
        store.attachments.put_artifact(req.run_id, path, size, sha256, at)
        return {"path": path, "size": size, "sha256": sha256}

    return mutate(ctx, req, apply)


def handle_checkpoint(ctx: Context, peer: Peer, req: Checkpoint) -> Awaitable[Reply]:
    data = as_json(req.data, "data")

    def apply(store: Store, at: float) -> Reply:
        row = store.runs.require(req.run_id)
        if row.state.terminal:
            raise RunnerdError(
                ErrorCode.INVALID_TRANSITION, f"cannot checkpoint a run that is {row.state}"
            )
        return {"seq": store.attachments.add_checkpoint(req.run_id, data, req.path, at)}

    return mutate(ctx, req, apply)
