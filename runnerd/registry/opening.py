"""Opening the registry file: refused, saying what to do, when it is on a network
filesystem, locked by another process, damaged or emptied; SQLite's errors as ours."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from runnerd.mounts import network_mount
from runnerd.registry.schema import migrate
from runnerd_client.protocol import ErrorCode, RunnerdError
from runnerd_client.trust import create_file, open_folder

# SQLite's primary result codes of a storage fault that may pass: a write that met one is
# worth trying again (a full disk is freed, a lock released, a flaky disk comes back).
TRANSIENT = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def error_code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of an error (-1 when it has none)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else -1


class DamagedRegistry(sqlite3.DatabaseError):
    """`PRAGMA quick_check` found the registry damaged; the message is what it found."""


class StorageError(RunnerdError):
    """A write the registry's storage refused for now (full, locked, I/O): tried again, it
    may land. Answered to a client as `unavailable`, which its spool retries."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


def write_error(exc: sqlite3.Error) -> RunnerdError:
    message = f"registry write failed: {exc}"
    return (
        StorageError(message)
        if error_code(exc) in TRANSIENT
        else RunnerdError(ErrorCode.UNAVAILABLE, message)
    )


def refuse_network_filesystem(path: Path, mountinfo: str) -> None:
    """WAL's shared-memory index is not coherent across machines: refuse before it is made."""
    found = network_mount(path.parent, mountinfo)
    if found is not None:
        point, fstype = found
        raise RunnerdError(
            ErrorCode.UNAVAILABLE,
            (
                f"refusing the registry {path}: it is on {fstype} (mounted at {point}), a "
                "network filesystem, and SQLite's WAL needs shared memory on a local "
                "filesystem. Use a node-local path such as $TMPDIR or /var/tmp, e.g. "
                "RUNNERD_DB=/var/tmp/$USER/runnerd/registry.sqlite3 (or runnerd --db)"
            ),
        )


def create_or_check_file(path: Path) -> bool:
    """Create the registry file 0600 (SQLite gives its -wal and -shm the same mode);
    whether it is new. An existing empty file is refused: SQLite would start a new
    registry over what was lost."""
    try:
        with open_folder(path.parent) as folder:
            os.close(create_file(folder, path.name, mode=0o600))
        return True
    except FileExistsError:
        pass
    if path.stat().st_size == 0:
        raise RunnerdError(
            ErrorCode.UNAVAILABLE,
            (
                f"the registry {path} exists but is empty (0 bytes): a failed copy or a "
                "full disk may have emptied it, and runnerd will not start a new registry "
                "over it. Put back a copy made with `runnerctl backup` if you have one; to "
                f"start afresh, remove it (rm {path}) and start runnerd again"
            ),
        )
    return False


def connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def prepare(conn: sqlite3.Connection, created: bool, synchronous: str) -> None:
    """WAL mode, the write lock taken once, a quick check of an existing file, then the
    pending migrations."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.DatabaseError(f"could not switch to WAL mode (got {mode})")
    # Take the write lock once: a registry another process holds is refused now, by name,
    # rather than at the first write.
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("ROLLBACK")
    if not created:
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise DamagedRegistry("; ".join(problems))
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)


def refusal(path: Path, exc: sqlite3.Error, busy_timeout_ms: int) -> str:
    """Why the registry cannot be used, and what to do about it."""
    code = error_code(exc)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (
            f"the registry {path} is locked by another process (waited "
            f"{busy_timeout_ms / 1000:g} s): another runnerd, or a tool such as "
            "sqlite3 or a backup, holds a write transaction on it. Find it with "
            f"`fuser -v {path}` (or `lsof {path}`), let it finish or stop it, then "
            "start runnerd again"
        )
    if code in DAMAGED or isinstance(exc, DamagedRegistry):
        return (
            f"the registry {path} is damaged ({exc}); runnerd will not write to it. "
            f"Keep it aside (mv {path} {path}.damaged, with its -wal file if any), "
            "then put back a copy made with `runnerctl backup`, or rebuild what "
            f"can be read: sqlite3 {path}.damaged .recover | sqlite3 {path} ; "
            "then start runnerd again"
        )
    return f"cannot open registry {path}: {exc}"
