"""runnerctl stack: where each Python process of a run is, without a debugger."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from runnerd.cli.common import EXIT_ERROR, cli, fail, request, say, shown
from runnerd_client.procinfo import catches, comm, fd_targets, is_python, tree
from runnerd_client.protocol import Get
from runnerd_client.stacks import STACK_SIGNAL

_STACK_FILE = re.compile(r"/stack-\d+\.txt$")
SETTLE = 0.2  # seconds a dump must stop growing to be whole


def py_spy() -> str | None:
    """The py-spy executable: on PATH, or beside this interpreter (the `stack` extra)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def via_py_spy(pid: int, timeout: float) -> tuple[str | None, str]:
    """py-spy's dump of every thread, or why there is none."""
    exe = py_spy()
    if exe is None:
        return None, "py-spy is not installed (pip install 'runnerd[stack]')"
    try:
        done = subprocess.run(
            [exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"py-spy did not answer within {timeout:g} s"
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout, ""
    reason = (done.stderr or done.stdout).strip().splitlines()
    return None, "py-spy cannot attach" + (f" ({reason[-1]})" if reason else "")


def stack_file(pid: int) -> str | None:
    """Where the process's handler writes: the stack-PID.txt it holds open."""
    return next((t for t in fd_targets(pid) or () if _STACK_FILE.search(t)), None)


def via_signal(pid: int, timeout: float) -> tuple[str | None, str]:
    """The dump the process's faulthandler writes to its run folder on STACK_SIGNAL (sent
    only to a process that catches it: SigCgt)."""
    path = stack_file(pid)
    if path is None or not catches(pid, STACK_SIGNAL):
        return None, "it dumps no stack on a signal (it never entered rd.run)"
    before = os.stat(path).st_size
    os.kill(pid, STACK_SIGNAL)
    deadline, size, settled = time.monotonic() + timeout, before, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = os.stat(path).st_size
        if now != size:
            size, settled = now, time.monotonic()
        elif size > before and time.monotonic() - settled >= SETTLE:
            with open(path, "rb") as fh:
                fh.seek(before)
                return fh.read(size - before).decode(errors="replace"), ""
    return None, f"no dump in {path} within {timeout:g} s"


def dump(pid: int, via: str, timeout: float) -> tuple[str | None, list[str]]:
    """A process's stacks by the first way that works; else why each failed."""
    ways = {"py-spy": via_py_spy, "signal": via_signal}
    reasons = []
    for name, way in ways.items():
        if via in ("auto", name):
            text, why = way(pid, timeout)
            if text is not None:
                return text, []
            reasons.append(f"{name}: {why}")
    return None, reasons


@cli.command()
@click.argument("run")
@click.option(
    "--via",
    type=click.Choice(["auto", "py-spy", "signal"]),
    default="auto",
    show_default=True,
    help="py-spy (attaches with ptrace), or the dump a process "
    "that entered rd.run writes to its run folder on a signal; auto tries both.",
)
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for each process's dump.",
)
@click.pass_context
def stack(ctx: click.Context, run: str, via: str, timeout: float) -> None:
    """Print the Python stack of every thread of each Python process of RUN (its attached
    processes and their descendants, on this machine), to see where a hung run waits."""
    info = request(ctx, Get(run=run))["run"]
    if info["host"] and info["host"] != socket.gethostname():
        fail(
            f"run {info['run_id']} runs on {shown(info['host'])}: run runnerctl stack there",
            EXIT_ERROR,
        )
    pids = tree(info["pids"])
    if not pids:
        fail(
            f"run {info['run_id']} ({info['state']}) has no live process on this machine",
            EXIT_ERROR,
        )
    printed = 0
    for pid in pids:
        name = comm(pid) or "?"
        if not is_python(pid):
            say(f"== process {pid} ({shown(name)}): not a Python process\n")
            continue
        text, reasons = dump(pid, via, timeout)
        if text is None:
            say(
                f"== process {pid} ({shown(name)}): cannot show its stack\n   "
                + "\n   ".join(shown(r) for r in reasons)
                + "\n"
            )
            continue
        printed += 1
        say(f"== process {pid} ({shown(name)})\n{text.rstrip()}\n")
    if not printed:
        fail(
            "no stack could be read: py-spy needs ptrace permission (same user, and "
            "kernel.yama.ptrace_scope 0, or CAP_SYS_PTRACE); the signal dump needs a "
            "process that entered rd.run",
            EXIT_ERROR,
        )
