"""What a batch of mutations changed, handed to the daemon's subscribers after the commit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runnerd.registry.rows import RunRow
from runnerd_client.protocol import State


@dataclass(slots=True)
class Transition:
    """A state change made inside the current batch, for after-commit work."""

    run_id: str
    from_state: State | None
    to_state: State
    at: float
    cause: str
    source: str


@dataclass
class Effects:
    """What a batch changed that the daemon must act on once it is committed."""

    transitions: list[Transition] = field(default_factory=list)
    attached: list[tuple[str, int, int | None]] = field(default_factory=list)
    detached: list[tuple[str, int]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    sweeps: list[str] = field(default_factory=list)

    def mark(self) -> tuple[int, ...]:
        return (
            len(self.transitions),
            len(self.attached),
            len(self.detached),
            len(self.events),
            len(self.sweeps),
        )

    def rollback(self, mark: tuple[int, ...]) -> None:
        """Forget what a rolled-back operation did."""
        del self.transitions[mark[0] :]
        del self.attached[mark[1] :]
        del self.detached[mark[2] :]
        del self.events[mark[3] :]
        del self.sweeps[mark[4] :]

    def take(self) -> Effects:
        """What was gathered so far, leaving this empty for the next batch."""
        taken = Effects(self.transitions, self.attached, self.detached, self.events, self.sweeps)
        self.transitions, self.attached, self.detached = [], [], []
        self.events, self.sweeps = [], []
        return taken


@dataclass
class BatchResult:
    """Each operation's outcome, plus the committed effects and the rows they touched."""

    outcomes: list[tuple[bool, Any]]
    effects: Effects = field(default_factory=Effects)
    rows: dict[str, RunRow] = field(default_factory=dict)
    metadata: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sweeps: set[str] = field(default_factory=set)
