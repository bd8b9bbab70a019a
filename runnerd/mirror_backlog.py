"""How far behind the mirror is: the runs changed and not written yet (one entry per run,
however often it changes), the cursor node.json carries to catch up from after a restart,
and whether writing failed and since when. `runnerctl status` reports it as the mirror's
state; the writer loop (`runnerd.mirror`) takes from it and puts back what did not land."""

from __future__ import annotations

import time
from itertools import islice
from typing import Any

from runnerd.registry import iso

RETRY_FIRST, RETRY_MAX = 1.0, 30.0
STALLED_AFTER = 10.0  # a file operation that has not returned in this long is a stall

Mark = tuple[int, float]  # a changed run's first event seq since it was written, and when


class Backlog:
    """The changed runs waiting to be written, and how the last write went."""

    def __init__(self) -> None:
        self.dirty: dict[str, Mark] = {}  # run_id -> (first seq, when)
        self.writing: dict[str, Mark] = {}  # taken from dirty, not landed
        self.seen_seq = 0
        self.complete = False  # the folder holds every run up to the cursor
        self.refreshed_at: float | None = None
        self.error: str | None = None
        self.failing_since: float | None = None

    def mark(self, run_id: str | None, seq: int, now: float) -> None:
        self.seen_seq = max(self.seen_seq, seq)
        if run_id and run_id not in self.dirty:
            self.dirty[run_id] = (seq, now)

    def take(self, count: int) -> list[str]:
        """Take up to `count` changed runs to write; they stay in `writing` until they land."""
        self.writing = {
            run_id: self.dirty.pop(run_id) for run_id in list(islice(self.dirty, count))
        }
        return list(self.writing)

    def unwrite(self, taken: dict[str, Mark]) -> None:
        """Mark runs changed again (keeping their first change)."""
        for run_id, mark in taken.items():
            self.dirty[run_id] = min(mark, self.dirty.get(run_id, mark))
        self.writing = {}

    def cursor(self) -> int:
        """The last event seq whose run is in the folder (to catch up from after a restart)."""
        if not self.complete:
            return 0
        if self.dirty:
            return min(seq for seq, _ in self.dirty.values()) - 1
        return self.seen_seq

    def landed(self) -> bool:
        """A write landed; True if writing had been failing until now."""
        recovered = self.error is not None
        self.refreshed_at = time.time()
        self.error = self.failing_since = None
        return recovered

    def failed(self, exc: BaseException) -> bool:
        """A write failed; True if it is the first failure since one landed."""
        first = self.error is None
        if first:
            self.failing_since = time.time()
        self.error = str(exc)
        return first

    def backoff(self) -> float:
        """How long to wait before writing again: longer the longer writing has failed."""
        if self.failing_since is None:
            return RETRY_FIRST
        return min(RETRY_MAX, max(RETRY_FIRST, (time.time() - self.failing_since) / 4))

    def report(self, busy_since: float | None, located: bool) -> dict[str, Any]:
        """The mirror's state for `status`; `busy_since` is when the file operation under
        way began (None if none is), `located` whether the node folder is found yet."""
        now = time.monotonic()
        waiting = [*self.dirty.values(), *self.writing.values()]
        oldest = min((when for _, when in waiting), default=None)
        if busy_since is not None and now - busy_since > STALLED_AFTER:
            state = "stalled"
        elif self.error is not None:
            state = "behind"
        else:
            state = "ok" if located else "starting"
        return {
            "state": state,
            "refreshed_at": iso(self.refreshed_at),
            "pending": len(waiting),
            "oldest_pending_sec": round(now - oldest, 3) if oldest is not None else None,
            "error": self.error,
            "failing_since": iso(self.failing_since),
            "writing_for_sec": round(now - busy_since, 3) if busy_since is not None else None,
        }
