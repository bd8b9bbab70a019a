"""Helpers shared by the store's subjects: times as the public objects show them, and WHERE
clauses of optional filters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC, the form every public run object uses."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the conditions whose value is given, and their arguments."""
    used = [(clause, value) for clause, value in conditions if value is not None]
    clause = f"WHERE {' AND '.join(clause for clause, _ in used)}" if used else ""
    return clause, [value for _, value in used]
