"""Times as every public object shows them (run objects, events, manifests, reports):
ISO 8601 UTC with milliseconds, written by the daemon and by runnerctl alike."""

from __future__ import annotations

import functools
import math
import time
from datetime import UTC, datetime


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC, the form every public run object uses. Each event
    and document has a few, so the text of the second is kept for the next (as datetime
    does, the fraction is rounded to microseconds, half to even, then cut to milliseconds)."""
    if ts is None:
        return None
    if not 0 <= ts < _YEAR_10000:
        text = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_second(int(whole))}.{micros // 1000:03d}Z"


_YEAR_10000 = 253_402_300_800.0


@functools.lru_cache(maxsize=64)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
