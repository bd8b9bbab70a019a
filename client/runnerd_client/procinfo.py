"""What /proc says about a process and the machine: shared by the client and the daemon."""

from __future__ import annotations

import functools

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if there is no such live
    (non-zombie) process: with the pid, it names one process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def owner_uid(pid: int) -> int | None:
    """The real uid of a live process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@functools.cache
def boot_id() -> str | None:
    """This boot's random id: another one at start-up means the machine went down."""
    try:
        with open(BOOT_ID) as fh:
            return fh.read().strip() or None
    except OSError:
        return None
