"""How tests/data/registry-v4.sqlite3 was made: runnerd at schema version 4 (git commit
3c2bdac, before schema 5) served these requests, then stopped. Kept for the record; the
file itself is frozen and never rebuilt by the tests.

    git archive 3c2bdac | tar -x -C /tmp/old
    python -m venv /tmp/oldvenv && /tmp/oldvenv/bin/pip install "aiosqlite>=0.20,<0.23" \
        anyio click msgpack watchfiles
    cd /tmp && PYTHONPATH=/tmp/old:/tmp/old/client /tmp/oldvenv/bin/python \
        /path/to/build_registry_v4.py OUT
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runnerd_client.connection import Connection
from runnerd_client.protocol import (
    Artifact,
    Checkpoint,
    Create,
    Fail,
    Label,
    Request,
    Start,
    Succeed,
    SweepCreate,
    SweepEnd,
)

T0 = 1_700_000_000.0  # 2023-11-14: every event at a fixed time, so the file says the same


def requests(root: Path) -> list[Request]:
    artifact = root / "model.bin"
    artifact.write_bytes(b"weights" * 100)
    return [
        Create(
            key="v4-create-ok",
            run_id="V4OK",
            experiment="v4",
            variation="lr=0.1",
            params={"lr": 0.1},
            tags={"team": "a"},
            at=T0,
        ),
        Start(key="v4-start-ok", run_id="V4OK", heartbeat_timeout=60.0, at=T0 + 1),
        Checkpoint(key="v4-ckpt-ok", run_id="V4OK", data={"step": 10}, at=T0 + 2),
        Artifact(key="v4-artifact-ok", run_id="V4OK", path=str(artifact), at=T0 + 3),
        Succeed(key="v4-succeed-ok", run_id="V4OK", at=T0 + 4),
        Create(
            key="v4-create-bad",
            run_id="V4BAD",
            experiment="v4",
            variation="lr=9",
            params={"lr": 9},
            at=T0 + 10,
        ),
        Start(key="v4-start-bad", run_id="V4BAD", at=T0 + 11),
        Checkpoint(key="v4-ckpt-bad", run_id="V4BAD", data={"step": 3}, at=T0 + 12),
        Fail(
            key="v4-fail-bad",
            run_id="V4BAD",
            failure_class="ValueError",
            message="bad lr 9",
            traceback="Traceback (most recent call last):\nValueError: bad lr 9",
            at=T0 + 13,
        ),
        SweepCreate(
            key="v4-sweep",
            sweep_id="V4SWEEP",
            experiment="v4-sweep",
            spec={"grid": {"x": [1, 2]}},
            folder=str(root / "sweep"),
            at=T0 + 20,
        ),
        Create(
            key="v4-cell0",
            run_id="V4CELL0",
            experiment="v4-sweep",
            variation="x=1",
            params={"x": 1},
            tags={"dask_key": "task-x1"},
            sweep_id="V4SWEEP",
            cell=0,
            at=T0 + 21,
        ),
        Start(key="v4-cell0-start", run_id="V4CELL0", at=T0 + 22),
        Succeed(key="v4-cell0-ok", run_id="V4CELL0", at=T0 + 23),
        Create(
            key="v4-cell1",
            run_id="V4CELL1",
            experiment="v4-sweep",
            variation="x=2",
            params={"x": 2},
            tags={"dask_key": "task-x2"},
            sweep_id="V4SWEEP",
            cell=1,
            at=T0 + 24,
        ),
        Start(key="v4-cell1-start", run_id="V4CELL1", at=T0 + 25),
        Fail(
            key="v4-cell1-fail",
            run_id="V4CELL1",
            failure_class="Signal:SIGKILL",
            message="process 4242 was killed",
            signal="SIGKILL",
            at=T0 + 26,
        ),
        Label(
            key="v4-cell1-label", run_id="V4CELL1", category="oom", note="seen by Dask", at=T0 + 27
        ),
        SweepEnd(key="v4-sweep-end", sweep_id="V4SWEEP", status="failed", at=T0 + 28),
    ]


def main(out: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="v4-", dir="/tmp"))
    socket, db = root / "rd.sock", root / "state" / "registry.sqlite3"
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_STATE_HOME": str(root / "state"),
    }
    daemon = subprocess.Popen(
        [sys.executable, "-m", "runnerd", "--socket", str(socket), "--db", str(db)], env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the old runnerd did not start")
            time.sleep(0.05)
        conn = Connection(socket, client="build_registry_v4")
        for req in requests(root):
            conn.call(req)
        conn.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    shutil.copyfile(db, out)  # the WAL is folded in by the daemon's clean stop
    shutil.rmtree(root)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
