"""A registry that runnerd at schema version 4 wrote (tests/data/registry-v4.sqlite3, frozen:
see build_registry_v4.py beside it) is opened by today's daemon: migrated in place, and
everything it held still reads, resumes and replays as it did."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from conftest import Daemon
from runnerd.registry import SCHEMA_VERSION, Store
from runnerd.testing import RawClient

FROZEN = Path(__file__).parent / "data" / "registry-v4.sqlite3"


@pytest.fixture
def upgraded(short_tmp: Path) -> Iterator[Daemon]:
    """Today's daemon on a copy of the frozen schema 4 registry."""
    daemon = Daemon(short_tmp)
    daemon.db.parent.mkdir(parents=True, mode=0o700)
    shutil.copyfile(FROZEN, daemon.db)
    daemon.db.chmod(0o600)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def raw(upgraded: Daemon) -> Iterator[RawClient]:
    client = RawClient(upgraded.socket)
    client.hello()
    try:
        yield client
    finally:
        client.close()


def test_the_frozen_registry_is_schema_4() -> None:
    with closing(sqlite3.connect(f"file:{FROZEN}?immutable=1", uri=True)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4


def test_it_is_migrated_in_place_to_todays_schema(upgraded: Daemon) -> None:
    upgraded.stop()
    with closing(sqlite3.connect(upgraded.db)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_its_runs_read_as_they_were_written(upgraded: Daemon) -> None:
    runs = {run["run_id"]: run for run in upgraded.ctl_json("list", "--limit", "10")}
    assert {run_id: run["state"] for run_id, run in runs.items()} == {
        "V4OK": "succeeded",
        "V4BAD": "failed_crash",
        "V4CELL0": "succeeded",
        "V4CELL1": "failed_crash",
    }
    ok = upgraded.ctl_json("show", "V4OK")
    assert (ok["params"], ok["tags"], ok["attempt"]) == ({"lr": 0.1}, {"team": "a"}, 1)
    assert (ok["created_at"], ok["ended_at"]) == (
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:13:24.000Z",
    )
    # Its events were dated years back: the old watchdog found it silent before it ended.
    assert [(t["to"], t["source"].split(":")[0]) for t in ok["transitions"]] == [
        ("pending", "client"),
        ("running", "client"),
        ("lost", "watchdog"),
        ("succeeded", "client"),
    ]
    assert [a["size"] for a in ok["artifacts"]] == [700]
    assert [c["data"] for c in ok["checkpoints"]] == [{"step": 10}]
    bad = upgraded.ctl_json("show", "V4BAD")["failure"]
    assert (bad["failure_class"], bad["message"], bad["category"]) == (
        "ValueError",
        "bad lr 9",
        "validation",
    )


def test_a_labelled_failure_and_its_sweep_read_as_they_were(upgraded: Daemon) -> None:
    killed = upgraded.ctl_json("show", "V4CELL1")["failure"]
    assert (killed["category"], killed["message"]) == (
        "oom",
        "process 4242 was killed (seen by Dask)",
    )
    sweep = upgraded.ctl_json("sweep", "show", "V4SWEEP")
    summary = sweep["cells_summary"]
    assert (sweep["status"], summary["total"], summary["succeeded"], summary["failed"]) == (
        "failed",
        2,
        1,
        1,
    )
    assert [(c["run_id"], c["state"]) for c in sweep["cells"]] == [
        ("V4CELL0", "succeeded"),
        ("V4CELL1", "failed"),
    ]


def test_dask_attempts_get_their_task_key_as_claim_token(upgraded: Daemon) -> None:
    upgraded.stop()
    with closing(sqlite3.connect(upgraded.db)) as db:
        store = Store(db)
        tokens = {
            run_id: row.claim_token
            for run_id in ("V4CELL0", "V4CELL1", "V4OK")
            if (row := store.runs.get(run_id)) is not None
        }
    assert tokens == {"V4CELL0": "task-x1", "V4CELL1": "task-x2", "V4OK": None}


def test_a_cell_is_claimed_again_by_the_task_its_attempt_ran(raw: RawClient) -> None:
    same_task = raw.request(
        "create",
        key="new-1",
        run_id="V5CELL1",
        experiment="v4-sweep",
        variation="x=2",
        params={"x": 2},
        sweep_id="V4SWEEP",
        cell=1,
        claim_token="task-x2",
    )
    assert same_task["ok"] is True and same_task["attempt"] == 2, same_task


def test_a_failed_run_resumes_from_its_checkpoint(raw: RawClient) -> None:
    reply = raw.request(
        "create",
        key="resume-bad",
        run_id="V5BAD",
        experiment="v4",
        variation="lr=9",
        params={"lr": 9},
        resume=True,
    )
    assert reply["ok"] is True, reply
    assert (reply["attempt"], reply["resumed_from"]) == (2, "V4BAD")
    assert (reply["resume_checkpoint"]["run_id"], reply["resume_checkpoint"]["data"]) == (
        "V4BAD",
        {"step": 3},
    )


def test_a_key_kept_before_digests_replays_its_first_reply(raw: RawClient) -> None:
    replay = raw.request(
        "create",
        key="v4-create-ok",
        run_id="V4OK",
        experiment="v4",
        variation="lr=0.1",
        params={"lr": 0.1},
        tags={"team": "a"},
    )
    assert replay["ok"] is True and (replay["run_id"], replay["attempt"]) == ("V4OK", 1)
    other_op = raw.request("succeed", key="v4-create-ok", run_id="V4OK")
    assert other_op["ok"] is False and other_op["error"]["code"] == "conflict"
