"""What /proc and the cgroup filesystem say about processes and the machine.

The one place that reads them, shared by the client, the daemon (the process watcher,
the resource sampler, the progress tracker) and runnerctl (exec, stack). Every reader
answers None (or False) for a process that is gone, never raises for it.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

BOOT_ID = "/proc/sys/kernel/random/boot_id"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60
_SYSCALLS_X86_64 = {
    0: "read", 1: "write", 7: "poll", 23: "select", 34: "pause", 35: "nanosleep",
    43: "accept", 45: "recvfrom", 47: "recvmsg", 61: "wait4", 202: "futex",
    228: "clock_gettime", 230: "clock_nanosleep", 232: "epoll_wait", 247: "waitid",
    270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 288: "accept4", 441: "epoll_pwait2",
}  # fmt: skip


def _read(path: Path | str, limit: int = -1, errors: str = "strict") -> str | None:
    """A file's text (its first `limit` bytes), or None if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode(errors=errors)
    except OSError:
        return None


def _text(path: str) -> str | None:
    """A short kernel file's text, stripped (bytes that are not UTF-8 replaced)."""
    text = _read(path, 4096, "replace")
    return None if text is None else text.strip()


# --- one process ------------------------------------------------------------------------


class Proc(NamedTuple):
    """One process as /proc/PID/stat shows it."""

    ppid: int
    cpu: float  # utime + stime, seconds
    rss: int  # bytes
    threads: int
    state: str  # R, S, D, T (stopped), t (traced), ...
    start: int  # clock ticks after boot: with the pid, it names one process across reuse


def read_proc(pid: int) -> Proc | None:
    """A live process's stat line; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return Proc(
        int(fields[1]),
        (int(fields[11]) + int(fields[12])) / TICKS,
        int(fields[21]) * PAGE,
        int(fields[17]),
        fields[0].decode(),
        int(fields[19]),
    )


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if there is no such live
    (non-zombie) process: with the pid, it names one process across pid reuse."""
    proc = read_proc(pid)
    return None if proc is None else proc.start


def _status(pid: int, key: bytes) -> bytes | None:
    """The first value of a line of /proc/PID/status (key with its colon), if any."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(key):
                    return line.split()[1]
    except OSError:
        return None
    return None


def owner_uid(pid: int) -> int | None:
    """The real uid of a live process, or None if it is gone."""
    value = _status(pid, b"Uid:")
    return None if value is None else int(value)


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (SigCgt)."""
    value = _status(pid, b"SigCgt:")
    return value is not None and bool(int(value, 16) >> (signum - 1) & 1)


def comm(pid: int) -> str | None:
    """The process's name (/proc/PID/comm), None if it is gone."""
    return _text(f"/proc/{pid}/comm")


def is_python(pid: int) -> bool:
    """Whether a process runs a Python interpreter (its executable, or libpython mapped)."""
    try:
        if os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith(("python", "pypy")):
            return True
    except OSError:
        pass
    return "libpython" in (_read(f"/proc/{pid}/maps", errors="replace") or "")


def fd_target(pid: int, fd: int | str) -> str | None:
    """What one of the process's file descriptors is open on (a path, 'pipe:[N]', ...)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def fd_targets(pid: int) -> list[str] | None:
    """What each of the process's file descriptors is open on; None if they cannot be read."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    return [target for fd in fds if (target := fd_target(pid, fd)) is not None]


def syscall_name(pid: int) -> str | None:
    """The system call a process is blocked in (/proc/PID/syscall), where readable."""
    text = _text(f"/proc/{pid}/syscall")
    if not text or text == "running" or not text.split()[0].lstrip("-").isdigit():
        return None
    number = int(text.split()[0])
    if number < 0:
        return None
    names = _SYSCALLS_X86_64 if os.uname().machine == "x86_64" else {}
    return names.get(number, f"syscall {number}")


def process_facts(pid: int) -> dict[str, Any] | None:
    """Name, state, kernel wait channel and system call of a live process."""
    proc = read_proc(pid)
    if proc is None:
        return None
    wchan = _text(f"/proc/{pid}/wchan")
    return {
        "pid": pid,
        "name": comm(pid) or "?",
        "state": proc.state,
        "cpu_seconds": round(proc.cpu, 2),
        "wchan": wchan if wchan not in ("", "0") else None,
        "syscall": syscall_name(pid),
    }


# --- process trees ----------------------------------------------------------------------


def process_table() -> dict[int, Proc]:
    """Every live process in /proc, by pid."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (proc := read_proc(int(entry.name))) is not None:
            table[int(entry.name)] = proc
    return table


def children_of(table: dict[int, Proc]) -> dict[int, list[int]]:
    """parent pid -> its children's pids."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, proc in table.items():
        children[proc.ppid].append(pid)
    return children


def with_descendants(
    roots: Iterable[int], table: dict[int, Proc], children: dict[int, list[int]] | None = None
) -> set[int]:
    """The live `roots` and all their descendants; pass `children` (children_of the
    table) when calling it for many groups over one table."""
    if children is None:
        children = children_of(table)
    found, todo = set(), [p for p in roots if p in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, ())
    return found


def _children(pid: int) -> list[int] | None:
    """A process's children from /proc/PID/task/*/children; None where the kernel lacks it."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        text = _text(f"/proc/{pid}/task/{task}/children")
        if text is None:
            return None if os.path.exists(f"/proc/{pid}") else []
        found += [int(p) for p in text.split()]
    return found


def tree(roots: Iterable[int]) -> list[int]:
    """The live `roots` and their descendants, read for these processes alone."""
    found: list[int] = []
    todo = [p for p in roots if read_proc(p) is not None]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        kids = _children(pid)
        if kids is None:  # no children files: the whole table
            return sorted(with_descendants(roots, process_table()))
        found.append(pid)
        todo += kids
    return found


# --- cgroups and the machine ------------------------------------------------------------


def machine_memory() -> int:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return UNLIMITED


def cgroup_paths(pid: int | str) -> tuple[str | None, str | None]:
    """A process's cgroup paths: (v1 memory controller's, v2's). A name that is not UTF-8
    is kept byte for byte (as os.fsdecode does), so the folder it names is found."""
    v1 = v2 = None
    for line in (_read(f"/proc/{pid}/cgroup", errors="surrogateescape") or "").splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers:
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def cgroup_dir(pid: int | str) -> Path | None:
    """The memory cgroup folder of a process (cgroup v2, else v1's memory controller)."""
    v1, v2 = cgroup_paths(pid)
    if v1 is not None and (CGROUP_ROOT / "memory").is_dir():
        return CGROUP_ROOT / "memory" / v1.lstrip("/")
    if v2 is not None:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            if (base / v2.lstrip("/") / "memory.max").exists():
                return base / v2.lstrip("/")
    return None


def folder_limit(folder: Path | None, machine: int) -> int:
    """A memory cgroup's limit, capped by the machine's memory."""
    if folder is None:
        return machine
    for name in ("memory.max", "memory.limit_in_bytes"):
        text = (_read(folder / name) or "").strip()
        if text.isdigit():
            return min(int(text), machine)
    return machine


def cgroup_peak(folder: Path | None) -> int | None:
    """The most memory the cgroup ever used, as the kernel counts it (v2, then v1)."""
    if folder is None:
        return None
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        text = (_read(folder / name) or "").strip()
        if text.isdigit():
            return int(text)
    return None


def oom_kills(folder: Path | None) -> int | None:
    """The cgroup's OOM-kill counter (v2 memory.events, v1 memory.oom_control)."""
    if folder is None:
        return None
    for name in ("memory.events", "memory.oom_control"):
        for line in (_read(folder / name) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def frozen(pid: int) -> bool:
    """Whether a process's cgroup (v2) is frozen: its tasks show as sleeping."""
    v2 = cgroup_paths(pid)[1]
    if v2 is None:
        return False
    events = _text(f"{CGROUP_ROOT}/{v2.lstrip('/')}/cgroup.events") or ""
    return "frozen 1" in events.splitlines()


@functools.cache
def boot_id() -> str | None:
    """This boot's random id: another one at start-up means the machine went down."""
    try:
        with open(BOOT_ID) as fh:
            return fh.read().strip() or None
    except OSError:
        return None
