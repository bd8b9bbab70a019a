"""The fault-injection harness at a small size (tests/chaos.py runs it large)."""

from __future__ import annotations

from pathlib import Path

from chaos import run_chaos


def test_daemon_kills_stops_and_client_kills_lose_nothing(short_tmp: Path) -> None:
    report = run_chaos(short_tmp, clients=8, runs=3, beats=15, daemon_kills=3,
                       client_kills=2, stops=1, stop_seconds=1.5, seed=7)
    assert report.runs >= 16  # the killed clients may not reach their last runs
    assert report.events_acked_live > 0
    assert report.lost == []
    assert report.duplicated == []
    assert report.wrong_state == []
