"""Times as every public object shows them: the quick path agrees with datetime's text."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from runnerd.times import iso


def by_datetime(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(st.floats(min_value=-1e10, max_value=2.5e11, allow_nan=False))
@example(1_764_700_000.9999996)  # rounds up into the next second
@example(1_764_700_000.0004995)
@example(0.0)
@example(-0.5)
@example(253_402_300_799.999)
def test_iso_is_datetimes_text(ts: float) -> None:
    assert iso(ts) == by_datetime(ts)


def test_iso_of_nothing_is_none() -> None:
    assert iso(None) is None
