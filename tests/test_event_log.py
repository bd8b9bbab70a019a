"""The event log's seqs are cursors (follow --since, subscribe, hooks): a seq is never given
twice, even after the newest events were pruned, and an upgraded registry keeps its own."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from runnerd.registry import NewRun, Store
from runnerd.registry.schema import migrate
from runnerd_client.protocol import State

FROZEN = Path(__file__).parent / "data" / "registry-v4.sqlite3"


def open_store(path: Path) -> Iterator[Store]:
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    try:
        yield Store(conn)
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    yield from open_store(tmp_path / "registry.sqlite3")


def ended_run(store: Store, run_id: str, at: float) -> None:
    store.runs.create(
        NewRun(
            run_id=run_id,
            experiment="e",
            variation=run_id,
            params_json="{}",
            tags_json="{}",
            created_at=at,
        ),
        "test",
    )
    row = store.runs.require(run_id)
    store.runs.set_state(row, State.SUCCEEDED, at=at, cause="test", source="test")


def test_a_pruned_events_seq_is_never_given_again(store: Store) -> None:
    ended_run(store, "OLD", at=1_000.0)
    ended_run(store, "NEW", at=2_000.0)
    before = store.events.last_seq()
    assert before > 0
    assert store.upkeep.prune(3_000.0, (), dry_run=False) == ["OLD", "NEW"]
    assert store.events.last_seq() == before
    ended_run(store, "NEXT", at=4_000.0)
    seqs = [event["seq"] for event in store.events.after(0, None, None, None, 100)]
    assert seqs and min(seqs) > before


def test_an_upgraded_registry_keeps_its_seqs_and_goes_on_above_them(tmp_path: Path) -> None:
    copy = tmp_path / "registry.sqlite3"
    shutil.copyfile(FROZEN, copy)
    with sqlite3.connect(f"file:{FROZEN}?immutable=1", uri=True) as old:
        kept = old.execute("SELECT seq, run_id FROM events ORDER BY seq").fetchall()
    assert kept
    for store in open_store(copy):
        events = store.events.after(0, None, None, None, 1000)
        assert [(e["seq"], e["run_id"]) for e in events] == [(s, r) for s, r in kept]
        store.upkeep.prune(10**10, (), dry_run=False)
        ended_run(store, "AFTER", at=10**10 + 1)
        assert min(e["seq"] for e in store.events.after(0, None, None, None, 100)) > kept[-1][0]
