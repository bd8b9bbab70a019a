"""The fault-injection harness at a small size, one fault per case (tests/chaos.py runs it
large): every event a client logged as acknowledged or spooled is found once, no run is
left active, every run ends in its true state."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos import FAULTS, Plan, run_chaos

SMALL = Plan(
    clients=4,
    runs=2,
    beats=10,
    daemon_kills=2,
    client_kills=2,
    stops=1,
    freezes=1,
    ack_wait=1.0,
    seed=7,
)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_loses_nothing(short_tmp: Path, fault: str) -> None:
    report = run_chaos(short_tmp, SMALL, (fault,))
    result = report.fault(fault)
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.runs >= SMALL.clients  # killed clients may not reach their last run
    assert result.acked > 0
    if fault in ("frozen_killed", "disk_full", "fork", "startup_deaths"):
        assert result.acked_spooled > 0, "the fault never made a client spool"
    assert result.lost == []
    assert result.duplicated == []
    assert result.wrong_state == []
    assert result.refused == []
    assert result.stuck == []
    assert result.found == result.acked
