"""Sweeps on the wire: cell claims, resume links, bad sweep requests, the schema upgrade;
and the pure cell logic both sides share (grids, variations, placeholders)."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Daemon, RawClient
from runnerd.registry import MIGRATIONS
from runnerd_client.cells import (
    SpecError,
    cell_key,
    changed_keys,
    count,
    differences,
    expand,
    grid_values,
    names_cell,
    placeholders,
    sorted_variation,
    substitute,
    variation,
)
from runnerd_client.ids import new_key, new_run_id

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def conn(shared_daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(shared_daemon.socket)
    client.hello()
    yield client
    client.close()


def call(conn: RawClient, op: str, /, **fields: Any) -> dict[str, Any]:
    req_id = next(_ids)
    reply = conn.call({"op": op, "id": req_id, **fields})
    assert reply["id"] == req_id
    return reply


def ok(conn: RawClient, op: str, /, **fields: Any) -> dict[str, Any]:
    reply = call(conn, op, **fields)
    assert reply["ok"], reply
    return reply


def error(conn: RawClient, op: str, /, **fields: Any) -> tuple[str, str]:
    reply = call(conn, op, **fields)
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


def new_sweep(conn: RawClient, experiment: str, grid: dict[str, list[Any]]) -> str:
    sweep_id = new_run_id()
    ok(
        conn,
        "sweep_create",
        key=new_key(),
        sweep_id=sweep_id,
        experiment=experiment,
        spec={"kind": "command", "command": ["true"], "cwd": "/", "grid": grid},
        failure_policy="continue_on_failure",
    )
    return sweep_id


def claim(
    conn: RawClient,
    sweep_id: str,
    experiment: str,
    cell: int,
    params: dict[str, Any],
    after: str | None = None,
    **extra: Any,
) -> tuple[str, dict[str, Any]]:
    run_id = new_run_id()
    fields = {"claim_after": after} if after else {}
    reply = call(
        conn,
        "create",
        key=new_key(),
        run_id=run_id,
        experiment=experiment,
        variation=variation(params),
        params=params,
        sweep_id=sweep_id,
        cell=cell,
        **fields,
        **extra,
    )
    return run_id, reply


def end(conn: RawClient, run_id: str, op: str = "fail", **fields: Any) -> None:
    ok(conn, "start", key=new_key(), run_id=run_id)
    ok(conn, op, key=new_key(), run_id=run_id, **fields)


def test_a_cell_is_claimed_once_per_attempt_it_follows(conn: RawClient) -> None:
    sweep_id = new_sweep(conn, "claims", {"x": [1, 2]})
    first, reply = claim(conn, sweep_id, "claims", 0, {"x": 1})
    assert reply["ok"] and reply["attempt"] == 1
    code, message = error(
        conn,
        "create",
        key=new_key(),
        run_id=new_run_id(),
        experiment="claims",
        variation="x=1",
        params={"x": 1},
        sweep_id=sweep_id,
        cell=0,
    )
    assert code == "conflict" and first in message  # planned as a first attempt: too late
    _, reply = claim(conn, sweep_id, "claims", 0, {"x": 1}, after=first)
    assert reply["error"]["code"] == "conflict"
    assert "live attempt 1" in reply["error"]["message"]  # the latest one is still pending
    end(conn, first, reason="crash", message="boom")
    second, reply = claim(conn, sweep_id, "claims", 0, {"x": 1}, after=first)
    assert reply["ok"] and reply["attempt"] == 2
    _, reply = claim(conn, sweep_id, "claims", 0, {"x": 1}, after=first)
    assert reply["error"]["code"] == "conflict"  # the other resume got there first
    cells = ok(conn, "sweep_cells", sweep=sweep_id)["cells"]
    assert [(c["index"], c["attempts"], c["run_id"], c["state"]) for c in cells] == [
        (0, 2, second, "running"),
        (1, 0, None, "pending"),
    ]  # a pending attempt is live


def test_cells_are_named_in_grid_order_and_claimed_with_their_params_in_any_order(
    conn: RawClient,
) -> None:
    """A claim whose params come in another order (named in that order, or keys sorted as
    an older client names them) is the cell's: its run is recorded under the cell's name,
    so the cell's attempts count on under one name; other params are refused."""
    sweep_id = new_sweep(conn, "order", {"x": [1, 3], "lr": [0.1]})
    cells = ok(conn, "sweep_cells", sweep=sweep_id)["cells"]
    assert [c["variation"] for c in cells] == ["x=1,lr=0.1", "x=3,lr=0.1"]
    first, reply = claim(conn, sweep_id, "order", 0, {"lr": 0.1, "x": 1})  # lr=0.1,x=1
    assert reply["ok"] and reply["attempt"] == 1, reply
    assert ok(conn, "get", run=first)["run"]["variation"] == "x=1,lr=0.1"
    end(conn, first, reason="crash", message="boom")
    second = new_run_id()
    reply = call(
        conn,
        "create",
        key=new_key(),
        run_id=second,
        experiment="order",
        variation="lr=0.1,x=1",
        params={"x": 1, "lr": 0.1},
        sweep_id=sweep_id,
        cell=0,
        claim_after=first,
        resume=True,
    )
    assert reply["ok"] and reply["attempt"] == 2 and reply["resumed_from"] == first, reply
    run = ok(conn, "get", run=second)["run"]
    assert (run["variation"], run["params"]) == ("x=1,lr=0.1", {"x": 1, "lr": 0.1})
    _, reply = claim(conn, sweep_id, "order", 1, {"lr": 0.1, "x": 1})
    assert reply["error"]["code"] == "bad_request"
    assert "is order/x=3,lr=0.1" in reply["error"]["message"]


def test_a_cell_that_succeeded_meanwhile_is_not_claimed_again(conn: RawClient) -> None:
    """A resume plans the cells that did not succeed; one that another driver ran to
    success since is not run a second time."""
    sweep_id = new_sweep(conn, "succeeded-meanwhile", {"x": [1]})
    first, _ = claim(conn, sweep_id, "succeeded-meanwhile", 0, {"x": 1})
    end(conn, first, op="succeed")
    _, reply = claim(conn, sweep_id, "succeeded-meanwhile", 0, {"x": 1}, after=first)
    assert reply["error"]["code"] == "conflict"
    assert f"succeeded meanwhile (run {first})" in reply["error"]["message"]


def test_a_replicating_attempt_is_linked_to_its_cell_and_claims_nothing(conn: RawClient) -> None:
    sweep_id = new_sweep(conn, "replicated", {"x": [1, 2]})
    first, _ = claim(conn, sweep_id, "replicated", 0, {"x": 1})
    end(conn, first, reason="crash", message="boom")
    recorded = ok(conn, "sweep_cells", sweep=sweep_id)["cells"]
    again, reply = claim(conn, sweep_id, "replicated", 0, {"x": 1}, replicates=True)
    assert reply["ok"], reply
    end(conn, again, op="succeed")
    _, reply = claim(conn, sweep_id, "replicated", 1, {"x": 2}, replicates=True)
    assert reply["ok"], reply  # a cell never run can be replicated too: it stays pending
    assert ok(conn, "sweep_cells", sweep=sweep_id)["cells"] == recorded
    linked = ok(conn, "get", run=again)["run"]
    assert (linked["sweep_id"], linked["cell"]) == (sweep_id, 0)
    _, reply = claim(conn, sweep_id, "replicated", 0, {"x": 2}, replicates=True)
    assert reply["error"]["code"] == "bad_request"  # not that cell's variation
    code, _ = error(
        conn, "create", key=new_key(), run_id=new_run_id(), experiment="replicated", replicates=True
    )
    assert code == "bad_request"  # replicating no cell


def test_a_claim_must_name_the_cells_experiment_and_variation(conn: RawClient) -> None:
    sweep_id = new_sweep(conn, "names", {"x": [1]})
    _, reply = claim(conn, sweep_id, "other", 0, {"x": 1})
    assert reply["error"]["code"] == "bad_request"
    _, reply = claim(conn, sweep_id, "names", 0, {"x": 2})
    assert reply["error"]["code"] == "bad_request"
    _, reply = claim(conn, sweep_id, "names", 5, {"x": 1})
    assert "no cell 5" in reply["error"]["message"]
    code, _ = error(
        conn, "create", key=new_key(), run_id=new_run_id(), experiment="names", sweep_id=sweep_id
    )
    assert code == "bad_request"  # a sweep without a cell
    _, reply = claim(conn, "NOSUCHSWEEP", "names", 0, {"x": 1})
    assert reply["error"]["code"] == "unknown_run"


def test_resume_links_to_the_last_unsuccessful_attempt_and_its_checkpoint(conn: RawClient) -> None:
    def create(params: dict[str, Any]) -> dict[str, Any]:
        return call(
            conn,
            "create",
            key=new_key(),
            run_id=new_run_id(),
            experiment="ckpt",
            variation="v",
            params=params,
            resume=True,
        )

    first = create({"lr": 0.1})
    assert first["ok"] and "resumed_from" not in first
    ok(conn, "start", key=new_key(), run_id=first["run_id"])
    ok(conn, "checkpoint", key=new_key(), run_id=first["run_id"], data={"epoch": 2})
    ok(conn, "fail", key=new_key(), run_id=first["run_id"], reason="crash")
    changed = create({"lr": 0.2, "wd": 1})
    assert changed["error"]["code"] == "conflict"
    assert "params changed: lr, wd" in changed["error"]["message"]
    second = create({"lr": 0.1})
    assert second["resumed_from"] == first["run_id"]
    assert second["resume_checkpoint"]["data"] == {"epoch": 2}
    live = create({"lr": 0.1})
    assert live["error"]["code"] == "conflict"  # the second one is still pending
    ok(conn, "cancel", key=new_key(), run_id=second["run_id"])
    third = create({"lr": 0.1})
    assert third["resumed_from"] == second["run_id"]
    # The second attempt made no checkpoint: the third gets the first's, through the chain.
    assert third["resume_checkpoint"]["run_id"] == first["run_id"]
    ok(conn, "start", key=new_key(), run_id=third["run_id"])
    ok(conn, "succeed", key=new_key(), run_id=third["run_id"])
    fresh = create({"lr": 0.9})
    assert fresh["ok"] and "resumed_from" not in fresh  # after a success: a fresh start


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"spec": {"grid": {}}}, "bad_request", "grid"),
        ({"spec": {"grid": {"x": []}}}, "bad_request", "non-empty list"),
        ({"spec": {"grid": {"x": 1}}}, "bad_request", "non-empty list"),
        ({"spec": {"cells": [1, 2]}}, "bad_request", "list of maps"),
        (
            {"spec": {"grid": {"x": list(range(1001)), "y": list(range(1000))}}},
            "bad_request",
            "1000000 cells, not 1001000",
        ),
        ({"failure_policy": "sometimes"}, "bad_request", "failure_policy"),
        ({"experiment": ""}, "bad_request", "experiment"),
        ({"sweep_id": "no spaces"}, "bad_request", "sweep_id"),
        ({"folder": "relative/dir"}, "bad_request", "absolute"),
        ({"spec": "not a map"}, "bad_request", "spec"),
    ],
)
def test_a_malformed_sweep_is_refused(
    conn: RawClient, fields: dict[str, Any], code: str, words: str
) -> None:
    request = {
        "key": new_key(),
        "sweep_id": new_run_id(),
        "experiment": "bad",
        "spec": {"grid": {"x": [1]}},
        **fields,
    }
    got, message = error(conn, "sweep_create", **request)
    assert got == code
    assert words in message


def test_sweep_reads_and_ends_answer_clearly(conn: RawClient) -> None:
    assert error(conn, "sweep_get", sweep="NOPE")[0] == "unknown_run"
    assert error(conn, "sweep_cells", sweep="NOPE")[0] == "unknown_run"
    assert error(conn, "sweep_cells", sweep="x", limit=0)[0] == "bad_request"
    sweep_id = new_sweep(conn, "ends", {"x": [1, 2, 3]})
    assert (
        error(conn, "sweep_end", key=new_key(), sweep_id=sweep_id, status="running")[0]
        == "bad_request"
    )
    assert (
        error(conn, "sweep_end", key=new_key(), sweep_id="NOPE", status="failed")[0]
        == "unknown_run"
    )
    duplicate = error(
        conn,
        "sweep_create",
        key=new_key(),
        sweep_id=sweep_id,
        experiment="x",
        spec={"grid": {"x": [1]}},
    )
    assert duplicate[0] == "conflict"
    key = new_key()
    first = ok(conn, "sweep_end", key=key, sweep_id=sweep_id, status="failed", skip=True)
    assert first["skipped"] == 3
    assert (
        ok(conn, "sweep_end", key=key, sweep_id=sweep_id, status="failed", skip=True)["skipped"]
        == 3
    )  # a replay answers the first reply
    sweep = ok(conn, "sweep_get", sweep=sweep_id[:12])["sweep"]
    assert sweep["status"] == "failed"
    assert sweep["cells_summary"]["skipped"] == 3
    manifest = json.loads(Path(sweep["manifest"]).read_text())
    assert manifest["cells_summary"] == sweep["cells_summary"]
    assert (
        error(
            conn, "fail", key=new_key(), run_id=new_run_id(), reason="crash", cause="Not Allowed"
        )[0]
        == "bad_request"
    )


def test_a_version_2_registry_is_upgraded_in_place(short_tmp: Path) -> None:
    daemon = Daemon(short_tmp)
    daemon.db.parent.mkdir(parents=True)
    db = sqlite3.connect(daemon.db)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"{script}; PRAGMA user_version = {number};")
    db.execute(
        "INSERT INTO runs (run_id, experiment, variation, attempt, state, params, tags,"
        " created_at) VALUES ('OLD1', 'old', 'default', 1, 'succeeded', '{}', '{}', 1)"
    )
    db.commit()
    db.close()
    daemon.start()
    try:
        run = daemon.ctl_json("show", "OLD1")
        assert (run["state"], run["sweep_id"], run["resumed_from"]) == ("succeeded", None, None)
        assert daemon.ctl("sweep", "list").stdout.strip() == "no sweeps"
    finally:
        daemon.stop()
    version = sqlite3.connect(daemon.db).execute("PRAGMA user_version").fetchone()[0]
    assert version == len(MIGRATIONS)


# --- the pure cell logic -------------------------------------------------------------


def test_a_grid_expands_in_order_the_last_key_fastest() -> None:
    spec = {"grid": {"lr": [0.1, 0.01], "seed": [1, 2, 3]}}
    cells = list(expand(spec))
    assert count(spec) == len(cells) == 6
    assert cells[:4] == [
        {"lr": 0.1, "seed": 1},
        {"lr": 0.1, "seed": 2},
        {"lr": 0.1, "seed": 3},
        {"lr": 0.01, "seed": 1},
    ]
    assert list(expand({"cells": [{"a": 1}], "grid": {"b": [2]}})) == [{"a": 1}]
    with pytest.raises(SpecError):
        list(expand({}))


def test_a_variation_is_readable_in_the_order_given() -> None:
    assert variation({"x": 3, "lr": 0.1}) == "x=3,lr=0.1"
    assert variation({"lr": 0.1, "x": 3}) == "lr=0.1,x=3"
    assert sorted_variation({"x": 3, "lr": 0.1}) == "lr=0.1,x=3"  # as names were recorded
    assert variation({}) == "default"
    assert variation({"opt": "adam", "layers": [1, 2]}) == "opt=adam,layers=[1,2]"
    long = variation({"text": "x" * 500})
    assert len(long) == 200 and long.startswith("text=xxx")
    assert long != variation({"text": "x" * 499})


def test_a_cell_is_named_by_its_name_or_its_params_in_any_order() -> None:
    cell = {"x": 3, "lr": 0.1}
    assert names_cell("x=3,lr=0.1", cell, "x=3,lr=0.1", cell)
    reordered = {"lr": 0.1, "x": 3}
    assert names_cell("lr=0.1,x=3", reordered, "x=3,lr=0.1", cell)  # its params' own order
    assert names_cell("x=3,lr=0.1", {"x": 3, "lr": 0.1}, "lr=0.1,x=3", cell)  # recorded sorted
    assert not names_cell("x=3,lr=0.1", {"x": 3, "lr": 0.2}, "lr=0.1,x=3", cell)
    assert not names_cell("x=true", {"x": True}, "x=1", {"x": 1})  # true is not 1
    assert not names_cell("other", cell, "x=3,lr=0.1", cell)
    assert cell_key(cell) == cell_key(reordered) != cell_key({"x": 3.0, "lr": 0.1})


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.integers(), st.text(max_size=30), st.booleans(), st.floats(allow_nan=False)),
        max_size=6,
    )
)
def test_variations_are_stable_short_and_tell_params_apart(params: dict[str, Any]) -> None:
    name = variation(params)
    assert 1 <= len(name) <= 200
    assert name == variation(dict(params.items()))
    reordered = dict(reversed(list(params.items())))
    assert sorted_variation(params) == sorted_variation(reordered)
    assert names_cell(variation(reordered), reordered, name, params)
    assert names_cell(sorted_variation(reordered), reordered, name, params)


def test_substitution_and_placeholders() -> None:
    command = ["train.py", "--lr={lr}", "{seed}", "{{literal}}"]
    assert placeholders(command) == {"lr", "seed"}
    assert substitute(command, {"lr": 0.1, "seed": 3, "unused": 1}) == [
        "train.py",
        "--lr=0.1",
        "3",
        "{literal}",
    ]
    with pytest.raises(SpecError, match="seed"):
        substitute(command, {"lr": 0.1})


def test_differences_name_what_changed() -> None:
    stored = {"command": ["a", "{x}"], "grid": {"x": [1, 2]}, "jobs": 2}
    assert differences(stored, {"command": ["a", "{x}"], "grid": None, "jobs": 9}) == []
    changed = differences(stored, {"command": ["b", "{x}"], "grid": {"x": [1]}})
    assert [line.split(":")[0] for line in changed] == ["command", "grid"]
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}) == ["b", "c"]


@pytest.mark.parametrize(
    ("given", "values"),
    [
        ('["ridge","lasso"]', ["ridge", "lasso"]),
        ("0.1,0.01", [0.1, 0.01]),
        ("0.1", [0.1]),
        ("adam,sgd", ["adam", "sgd"]),
        ('"a,b"', ["a,b"]),
        ('{"depth":2}', [{"depth": 2}]),
        ("[[1,2],[3]]", [[1, 2], [3]]),
        ("true,null", [True, None]),
    ],
)
def test_a_grid_value_is_json_when_it_parses_else_a_comma_list(
    given: str, values: list[Any]
) -> None:
    assert grid_values("k", given) == values


@pytest.mark.parametrize("given", ['["ridge",lasso]', '["ridge"', 'a"b', "1,,2", ","])
def test_an_ambiguous_grid_value_is_refused(given: str) -> None:
    with pytest.raises(SpecError, match="k="):
        grid_values("k", given)
