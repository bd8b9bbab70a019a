"""Diagnosis of a failure record (SPEC §3): its category, whether a rerun may help, and why.

The heuristics are the rule table of `runnerd.diagnosis_rules`, read top to bottom: the
earliest rule that matches wins. A record is more than its class and message: its
traceback (for a command, the tail of its stderr) shows the exceptions that caused the
last one and the lines a person would read (a "Killed", Slurm's time limit, an NCCL
watchdog). Each of those is matched too, and the earliest rule any of them reaches wins:
the root cause is named, not its echo.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from runnerd.diagnosis_rules import RULES, Facts, Rule
from runnerd_client.tracebacks import explain

MATCH_LIMIT = 4096
EVIDENCE_LIMIT = 16 * 1024
RAISED_LIMIT = 20  # the exceptions of a traceback that are matched (a log may print thousands)
WITNESSED = ("oom", "walltime", "retired", "killed_worker")


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` concludes about one failure."""

    category: str
    retryable: bool
    pattern: str
    suggestion: str


def _text(value: Any) -> str:
    """A field as text; a missing or None field is empty."""
    return "" if value is None else str(value).strip()


def _signal_name(value: Any, failure_class: str) -> str | None:
    """'SIGKILL' from the record's signal field, else from a 'Signal:SIGKILL' class."""
    name = _text(value).upper()
    if not name and failure_class.startswith("Signal:"):
        name = failure_class.removeprefix("Signal:").upper()
    if not name:
        return None
    return name if name.startswith("SIG") else f"SIG{name}"


def _exit_code(value: Any) -> int | None:
    """The exit code if it is an int (a bool or a string is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _short(failure_class: str) -> str:
    """A qualified class 'pkg.mod.Error' counts as 'Error' (a 'Signal:X' stays whole)."""
    return (
        failure_class if failure_class.startswith("Signal:") else failure_class.rsplit(".", 1)[-1]
    )


def _facts(record: Mapping[str, Any], category_hint: str | None) -> list[Facts]:
    """What rules match against: the record itself first, then each exception and notable
    line its traceback shows (all sharing the record's reason, signal and exit code)."""
    failure_class = _text(record.get("failure_class"))
    message = _text(record.get("message"))
    found = explain(_text(record.get("traceback")))
    others = [(str(r.failure_class), r.message) for r in found.raised[-RAISED_LIMIT:]]
    others += [("", line) for line in (*found.notes, found.ending) if line]
    evidence = "\n".join([f"{failure_class}: {message}", *(f"{c}: {m}" for c, m in others)])[
        -EVIDENCE_LIMIT:
    ]
    primary = Facts(
        failure_class=_short(failure_class),
        message=message[:MATCH_LIMIT],  # rules read the head (BUG-2)
        reason=_text(record.get("reason")).lower(),
        signal=_signal_name(record.get("signal"), failure_class),
        exit_code=_exit_code(record.get("exit_code")),
        hint=_text(category_hint).lower() or None,
        evidence=evidence,
    )
    return [
        primary,
        *(replace(primary, failure_class=_short(c), message=m[:MATCH_LIMIT]) for c, m in others),
    ]


def match_rule(record: Mapping[str, Any], category_hint: str | None = None) -> Rule:
    """The earliest rule of `RULES` that the record, or anything its traceback shows,
    matches (the catch-all if none does)."""
    best = len(RULES) - 1
    for facts in _facts(record, category_hint):
        for index in range(best):
            if RULES[index].matches(facts):
                best = index
                break
    return RULES[best]


def diagnose(record: Mapping[str, Any], category_hint: str | None = None) -> Diagnosis:
    """Category, retryability and advice for a failure record of SPEC §3.

    `category_hint="oom"` is how a caller that knows more (e.g. dmesg showed the OOM
    killer) turns a bare SIGKILL into oom; the record alone never makes that leap.
    """
    rule = match_rule(record, category_hint)
    return Diagnosis(rule.category, rule.retryable, rule.pattern, rule.suggestion)


def relabel(record: Mapping[str, Any], category: str, note: str | None) -> tuple[str, Diagnosis]:
    """A failure record re-diagnosed with what an outside witness says killed the run: its
    message with the witness's note (part of what the diagnosis reads), and the diagnosis."""
    message = str(record["message"])
    if note and note not in message:
        message = f"{message} ({note})"
    return message, diagnose({**record, "message": message}, category)


def _witnessed(record: Mapping[str, Any]) -> str | None:
    """A stored category only a witness can give (a hint): kept when re-diagnosing."""
    category = record.get("category")
    return category if category in WITNESSED else None


def findings(records: list[Mapping[str, Any]], examples: int = 5) -> list[dict[str, Any]]:
    """Failure records grouped by the rule that explains them, most frequent first."""
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        rule = match_rule(record, _witnessed(record))
        group = groups.setdefault(
            rule.pattern,
            {
                "category": rule.category,
                "pattern": rule.pattern,
                "retryable": rule.retryable,
                "suggestion": rule.suggestion,
                "count": 0,
                "run_ids": [],
                "example": {
                    "failure_class": record.get("failure_class"),
                    "message": record.get("message"),
                },
            },
        )
        group["count"] += 1
        if len(group["run_ids"]) < examples:
            group["run_ids"].append(record.get("run_id"))
    return sorted(groups.values(), key=lambda g: -g["count"])
