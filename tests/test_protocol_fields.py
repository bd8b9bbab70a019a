"""What a request's fields may hold is declared beside them and checked by decode_request:
closed sets, ranges, patterns, lengths and absolute paths, each refusal naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from runnerd_client.fields import MAX_LIST, MAX_NAME, field_specs
from runnerd_client.protocol import (
    REQUESTS,
    Create,
    ExportWhat,
    FailReason,
    GroupBy,
    LabelCategory,
    ListRuns,
    RunnerdError,
    State,
    SweepPolicy,
    decode_request,
)

KEYED = {"key": "k1", "run_id": "R1"}
REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    "run-id-pattern": (
        {"op": "create", **KEYED, "run_id": "a b", "experiment": "e"},
        "run_id",
        "1-64 characters",
    ),
    "retry-of-pattern": (
        {"op": "create", **KEYED, "experiment": "e", "retry_of": "../x"},
        "retry_of",
        "1-64 characters",
    ),
    "claim-after-pattern": (
        {"op": "create", **KEYED, "experiment": "e", "claim_after": ""},
        "claim_after",
        "1-64 characters",
    ),
    "empty-experiment": (
        {"op": "create", **KEYED, "experiment": ""},
        "experiment",
        f"1-{MAX_NAME} characters",
    ),
    "long-variation": (
        {"op": "create", **KEYED, "experiment": "e", "variation": "v" * 257},
        "variation",
        f"1-{MAX_NAME} characters",
    ),
    "relative-run-dir": (
        {"op": "create", **KEYED, "experiment": "e", "run_dir": "runs/x"},
        "run_dir",
        "absolute path",
    ),
    "nul-in-cwd": (
        {"op": "create", **KEYED, "experiment": "e", "cwd": "/tmp/a\0b"},
        "cwd",
        "absolute path",
    ),
    "zero-deadline": ({"op": "start", **KEYED, "deadline": 0}, "deadline", "positive"),
    "negative-grace": ({"op": "start", **KEYED, "lost_grace": -1.5}, "lost_grace", "positive"),
    "seq-zero": ({"op": "heartbeat", "run_id": "R1", "seq": 0}, "seq", "1 or more"),
    "lost-is-the-daemons": (
        {"op": "fail", **KEYED, "reason": "lost"},
        "reason",
        "one of crash, abandoned, timeout",
    ),
    "cause-pattern": ({"op": "fail", **KEYED, "cause": "Not Allowed"}, "cause", "a-z, 0-9"),
    "unknown-state": ({"op": "list", "state": "sleeping"}, "state", "one of pending"),
    "limit-zero": ({"op": "list", "limit": 0}, "limit", f"between 1 and {MAX_LIST}"),
    "limit-too-big": ({"op": "failures", "limit": MAX_LIST + 1}, "limit", "between"),
    "group-by": ({"op": "failures", "group_by": "host"}, "group_by", "class, signature"),
    "export-what": ({"op": "export", "what": "sweeps"}, "what", "runs, failures"),
    "relative-watch": ({"op": "watch", "path": "here"}, "path", "absolute path"),
    "active-state-pruned": (
        {"op": "prune", "before": 1.0, "states": ["succeeded", "lost"]},
        "states",
        "one of succeeded",
    ),
    "since-negative": ({"op": "subscribe", "since": -1}, "since", "0 or more"),
    "label-category": (
        {"op": "label", **KEYED, "category": "gremlins"},
        "category",
        "oom, walltime",
    ),
    "sweep-id-pattern": (
        {"op": "sweep_create", "key": "k", "sweep_id": "no spaces", "experiment": "e", "spec": {}},
        "sweep_id",
        "1-64 characters",
    ),
    "failure-policy": (
        {
            "op": "sweep_create",
            "key": "k",
            "sweep_id": "S1",
            "experiment": "e",
            "spec": {},
            "failure_policy": "sometimes",
        },
        "failure_policy",
        "fail_fast, continue_on_failure",
    ),
    "relative-folder": (
        {
            "op": "sweep_create",
            "key": "k",
            "sweep_id": "S1",
            "experiment": "e",
            "spec": {},
            "folder": "rel",
        },
        "folder",
        "absolute",
    ),
    "end-still-running": (
        {"op": "sweep_end", "key": "k", "sweep_id": "S1", "status": "running"},
        "status",
        "succeeded, failed, interrupted",
    ),
    "cells-limit": ({"op": "sweep_cells", "sweep": "S1", "limit": 0}, "limit", "between"),
    "relative-artifact": (
        {"op": "artifact", **KEYED, "path": "model.bin"},
        "path",
        "absolute path",
    ),
}


@pytest.mark.parametrize(("msg", "field", "why"), REFUSED.values(), ids=REFUSED.keys())
def test_a_field_out_of_bounds_is_refused_naming_it(
    msg: dict[str, Any], field: str, why: str
) -> None:
    with pytest.raises(RunnerdError) as caught:
        decode_request(msg)
    assert caught.value.code == "bad_request"
    assert f"{msg['op']}: {field} must be" in caught.value.message
    assert why in caught.value.message


def test_fields_within_bounds_decode() -> None:
    _, req = decode_request(
        {
            "op": "create",
            "id": 7,
            **KEYED,
            "experiment": "e" * MAX_NAME,
            "run_dir": "/tmp/x",
            "claim_after": "A" * 64,
        }
    )
    assert isinstance(req, Create) and req.run_dir == "/tmp/x"
    _, listed = decode_request({"op": "list", "state": "lost", "limit": MAX_LIST})
    assert isinstance(listed, ListRuns) and (listed.state, listed.limit) == ("lost", MAX_LIST)
    decode_request({"op": "prune", "before": 1.0, "states": ["failed_crash", "succeeded"]})
    decode_request({"op": "subscribe", "since": 0})
    decode_request({"op": "fail", **KEYED, "reason": "timeout", "cause": "oom_2"})


def test_a_field_left_out_is_not_checked() -> None:
    _, req = decode_request({"op": "create", **KEYED, "experiment": "e"})
    assert isinstance(req, Create) and req.run_dir is None and req.variation == "default"


@pytest.mark.parametrize(
    ("op", "field", "members"),
    [
        ("list", "state", State),
        ("failures", "group_by", GroupBy),
        ("export", "what", ExportWhat),
        ("label", "category", LabelCategory),
        ("sweep_create", "failure_policy", SweepPolicy),
    ],
)
def test_closed_sets_are_the_enums(op: str, field: str, members: type[Any]) -> None:
    spec = next(s for s in field_specs(REQUESTS[op]) if s.name == field)
    assert [check.problem(value) for value in members for check in spec.checks] == [None] * len(
        members
    )
    assert all(check.problem("no-such-value") is not None for check in spec.checks)


def test_fail_reasons_a_client_may_give() -> None:
    spec = next(s for s in field_specs(REQUESTS["fail"]) if s.name == "reason")
    allowed = [r for r in FailReason if all(c.problem(r) is None for c in spec.checks)]
    assert allowed == [FailReason.CRASH, FailReason.ABANDONED, FailReason.TIMEOUT]
