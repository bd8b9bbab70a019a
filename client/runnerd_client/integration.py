"""What the MLflow, Hydra and Optuna integrations share.

In the experiment: the runnerd run the code executes in, and notes recorded on it. On the
hook side (a `[[hooks]]` command the daemon runs on a run event): reading the hook's input
and waiting until a failed run's processes are gone, so that a hook never races the
experiment's own code to end a tool's record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from runnerd_client import trust
from runnerd_client.procinfo import read_proc
from runnerd_client.protocol import State
from runnerd_client.run import ACTIVE, RUN_ID_ENV, Run

FAILED = frozenset(
    {State.FAILED_CRASH, State.FAILED_ABANDONED, State.FAILED_TIMEOUT, State.FAILED_LOST}
)
GONE_WAIT = 5.0
"""How long a hook waits for a failed run's processes to exit before it acts anyway (a
`runnerctl cancel` without a signal leaves them running)."""

_attached: dict[tuple[int, str], Run] = {}
_attached_lock = threading.Lock()


def enclosing_run() -> Run | None:
    """The run this code executes in: the `with rd.run()` block's or sweep cell's, else the
    one `$RUNNERD_RUN_ID` names (`runnerctl exec`), attached once per process."""
    active = ACTIVE.get()
    if active is not None:
        return active
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        return None
    from runnerd_client import connect

    with _attached_lock:
        key = (os.getpid(), run_id)
        if key not in _attached:
            _attached[key] = connect().attach(run_id)
        return _attached[key]


def write_note(run: Run, name: str, data: dict[str, Any], *, wait: bool = False) -> Path:
    """Record `data` on the run as `run_dir/name`, a JSON file registered as an artifact:
    `runnerctl show` lists it and a hook reads it. `wait` returns once it is recorded."""
    path = run.run_dir / name
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    trust.write_atomically(run.run_dir, name, text.encode())
    run.artifact(path)
    if wait:
        run.flush()
    return path


# --- the hook side ---


@dataclass(frozen=True)
class HookInput:
    """What a hook command reads on stdin: its name, the event, and the run as
    `runnerctl show RUN --json` prints it."""

    hook: str
    event: dict[str, Any]
    run: dict[str, Any]

    @property
    def state(self) -> str:
        return str(self.run.get("state") or "")

    @property
    def failed(self) -> bool:
        return self.state in FAILED


def read_hook_input(stream: IO[str]) -> HookInput:
    """Parse a hook's stdin. A run pruned meanwhile, or a sweep's event, has `"run": null`:
    its run is then empty (no state), which the integrations leave alone."""
    try:
        payload = json.load(stream)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the hook's input is not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("run", {}), dict | None):
        raise ValueError('the hook\'s input must be an object whose "run" is an object or null')
    event, run = payload.get("event"), payload.get("run")
    return HookInput(
        str(payload.get("hook") or ""), event if isinstance(event, dict) else {}, run or {}
    )


def notes(run: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """The notes (see `write_note`) among a run's artifacts whose names start with
    `prefix`; a note that cannot be read is left out."""
    found = []
    for artifact in run.get("artifacts") or []:
        path = Path(str(artifact.get("path", "")))
        if not (path.name.startswith(prefix) and path.suffix == ".json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"note {path} not read: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict):
            found.append(data)
    return found


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    return read_proc(pid) is not None


def wait_gone(pids: Iterable[int], timeout: float = GONE_WAIT) -> bool:
    """Wait until none of `pids` is alive; False if some still are after `timeout`."""
    deadline = time.monotonic() + timeout
    waiting = [pid for pid in pids if pid != os.getpid()]
    while True:
        waiting = [pid for pid in waiting if alive(pid)]
        if not waiting:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def hook_parser(prog: str) -> argparse.ArgumentParser:
    """`python -m PROG hook [OPTIONS]`, for an integration to add its options to."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument(
        "command", choices=["hook"], help="act on one runnerd hook event read from stdin"
    )
    return parser


def run_hook(prog: str, handle: Callable[[HookInput], None]) -> int:
    """Read the hook's input and act on it: exit 0 once done (the daemon counts the event
    delivered), 1 on an error (it retries later)."""
    try:
        handle(read_hook_input(sys.stdin))
    except Exception as exc:  # reported, and the daemon retries the event
        print(f"{prog} hook: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def hook_main(prog: str, handle: Callable[[HookInput], None], argv: list[str] | None = None) -> int:
    """`python -m PROG hook` for an integration without options (2 on a usage error)."""
    hook_parser(prog).parse_args(argv)
    return run_hook(prog, handle)
