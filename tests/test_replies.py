"""Typed replies: a reply object made a map (`fields_of`/`as_map`, as the daemon sends it)
and read back (`decode`, as runnerctl reads it) is the same object; a key the class does
not know is ignored, a missing one is an error that names it; and what runnerctl shows of
such a record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon
from runnerd_client.replies import (
    ArtifactInfo,
    CellInfo,
    CheckpointInfo,
    CrashFileInfo,
    DaemonInfo,
    FailureGroup,
    FailureInfo,
    ListedFailure,
    MalformedReply,
    ResumeCheckpoint,
    RunDetails,
    RunInfo,
    StatusInfo,
    SweepInfo,
    TransitionInfo,
    as_map,
    decode,
    fields_of,
)

AT = "2026-01-01T00:00:00Z"
FAILURE = FailureInfo(
    "R1", "MemoryError", "out of memory", "Traceback ...", "train", "crash", "sig", "oom", False,
    None, "SIGKILL", AT,
)  # fmt: skip
LISTED = ListedFailure(*(getattr(FAILURE, name) for name in FAILURE.__slots__), "e", "v", "n1")
RUN = dict(
    run_id="R1", experiment="e", variation="v", attempt=2, state="failed_crash", cwd="/w",
    run_dir="/w/R1", host="n1", heartbeats=7, heartbeat_timeout=30.0, lost_grace=None,
    deadline=None, retry_of="R0", resumed_from=None, sweep_id="S1", cell=3,
    params={"lr": 0.1, "layers": [1, 2]}, launch={"command": ["python", "t.py"]},
    tags={"team": "x"}, created_at=AT, started_at=AT, ended_at=AT, last_heartbeat_at=None,
    pids=[10, 11],
    resources={"peak_rss_bytes": 1 << 20, "cpu_seconds": 1.5, "limit_bytes": 1 << 30},
    failure=FAILURE,
)  # fmt: skip
DETAILS = RunDetails(
    **RUN,
    transitions=[
        TransitionInfo(1, AT, None, "pending", "create", "client"),
        TransitionInfo(2, AT, "pending", "running", "start", "client"),
    ],
    artifacts=[ArtifactInfo("model.pt", 10, "ab" * 32, AT)],
    crash_files=[CrashFileInfo("core.1", "core", 5, None)],
    checkpoints=[CheckpointInfo(1, {"epoch": 3}, None, AT)],
)
DAEMON = DaemonInfo("1.0", 1, 42, 3.5, "/run/rd.sock", "/var/rd.db", 4096, 2)
CELL = CellInfo(0, {"lr": 0.1}, "lr=0.1", "R1", 1, "failed_crash", "n1", FAILURE)
EVERY = [
    FAILURE,
    LISTED,
    FailureGroup("MemoryError", 2, AT, AT, ["R1", "R2"], {"failure_class": "MemoryError"}),
    RunInfo(**RUN),
    DETAILS,
    DETAILS.transitions[0],
    DETAILS.artifacts[0],
    DETAILS.crash_files[0],
    DETAILS.checkpoints[0],
    ResumeCheckpoint("R0", 1, {"epoch": 3}, "/w/ckpt", AT),
    CELL,
    CellInfo(1, {"lr": 1.0}, "lr=1.0", None, 0, "pending", None, None),
    SweepInfo(
        "S1",
        "e",
        "fail_fast",
        {"kind": "command"},
        "/s",
        "/s/manifest.json",
        "running",
        AT,
        None,
        99,
        {"total": 2, "failed": 1},
    ),  # fmt: skip
    DAEMON,
    StatusInfo({"running": 1, "failed_crash": 1}, [RunInfo(**RUN)], [LISTED], DAEMON),
]


def wire(reply: Any) -> Any:
    """A reply as a client receives it: maps all the way down (msgpack gives lists)."""
    return json.loads(json.dumps(as_map(reply)))


@pytest.mark.parametrize("reply", EVERY, ids=lambda reply: type(reply).__name__)
def test_every_reply_comes_back_from_its_map(reply: Any) -> None:
    assert list(fields_of(reply)) == list(wire(reply))
    assert decode(type(reply), wire(reply)) == reply


def test_the_transition_keys_are_sent_without_the_trailing_underscore() -> None:
    sent = wire(DETAILS)["transitions"][1]
    assert "from_" not in sent and sent["from"] == "pending"
    assert decode(RunDetails, wire(DETAILS)).transitions[1].from_ == "pending"


def test_nested_replies_are_built_as_their_classes() -> None:
    status = decode(StatusInfo, wire(EVERY[-1]))
    assert isinstance(status.daemon, DaemonInfo) and status.daemon.pid == 42
    assert isinstance(status.active[0], RunInfo) and status.active[0].failure == FAILURE
    assert isinstance(status.failures[0], ListedFailure) and status.failures[0].host == "n1"
    details = decode(RunDetails, wire(DETAILS))
    assert [c.data for c in details.checkpoints] == [{"epoch": 3}]
    assert decode(CellInfo, wire(CELL)).failure == FAILURE


def test_a_key_a_newer_daemon_adds_is_ignored() -> None:
    sent = wire(EVERY[-1])
    sent["mirror"] = {"state": "ok"}
    sent["active"][0]["gpu"] = {"memory": 1}
    sent["daemon"]["build"] = "abc"
    assert decode(StatusInfo, sent) == EVERY[-1]


def test_a_missing_key_is_an_error_naming_the_reply_and_the_field() -> None:
    sent = wire(EVERY[-1])
    del sent["active"][0]["state"]
    with pytest.raises(MalformedReply) as caught:
        decode(StatusInfo, sent, "status")
    assert caught.value.message == ("malformed reply: status.active[0] has no 'state'")
    with pytest.raises(MalformedReply, match="RunInfo has no 'run_id'"):
        decode(RunInfo, {"state": "running"})


def test_a_nested_reply_that_is_not_a_map_or_list_is_an_error() -> None:
    sent = wire(DETAILS)
    sent["failure"] = "oops"
    with pytest.raises(MalformedReply, match=r"get\.failure is not a map"):
        decode(RunDetails, sent, "get")
    sent = wire(DETAILS)
    sent["transitions"] = None
    with pytest.raises(MalformedReply, match=r"get\.transitions is not a list"):
        decode(RunDetails, sent, "get")
    with pytest.raises(MalformedReply, match="status is not a map"):
        decode(StatusInfo, [1, 2], "status")


def test_runnerctl_shows_a_record_with_a_newer_field_and_names_a_missing_one(
    short_tmp: Path,
) -> None:
    """An export line holds a run as the daemon sends it: a field this runnerctl does not
    know is shown in --json and ignored in the table; a run whose line lacks a field it
    needs is named on stderr with its file and the field and left out of the table, the
    other runs still listed (--json still prints every line)."""
    line = {**wire(RunInfo(**RUN)), "gpu": {"memory": 1}}
    export = short_tmp / "a.jsonl"
    export.write_text(json.dumps(line) + "\n")
    ctl = Daemon(short_tmp).runnerctl
    shown = ctl("list", "--from", str(short_tmp))
    assert shown.returncode == 0, shown.stderr
    assert "R1" in shown.stdout and "MemoryError: out of memory" in shown.stdout
    one = ctl("show", "R1", "--from", str(short_tmp))  # an export line has no history
    assert one.returncode == 0, one.stderr
    assert "Failure: MemoryError (crash), signature sig" in one.stdout
    assert json.loads(ctl("list", "--from", str(short_tmp), "--json").stdout) == [
        {**line, "daemon": str(export)}
    ]
    del line["pids"]
    good = {**wire(RunInfo(**RUN)), "run_id": "R2"}
    export.write_text(json.dumps(line) + "\n" + json.dumps(good) + "\n")
    broken = ctl("list", "--from", str(short_tmp))
    assert broken.returncode == 0, broken.stderr
    assert f"malformed reply: run R1 of {export} has no 'pids'" in broken.stderr
    assert "R2" in broken.stdout and "R1" not in broken.stdout
    listed = json.loads(ctl("list", "--from", str(short_tmp), "--json").stdout)
    assert {run["run_id"] for run in listed} == {"R1", "R2"}
