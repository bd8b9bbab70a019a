"""Diagnosis of a failure record (SPEC §3): its category, whether a rerun may help, and why.

The heuristics are one table, `RULES`, read top to bottom; the first rule that matches
wins. A rule matches when ANY of its criteria does (an exception class name, a regex on the
message, a reason, a signal, an exit code, the caller's category hint), so order carries
the meaning: specific rules sit above general ones ("CUDA out of memory" is a RuntimeError
that must be oom; a ValueError saying "nan" must be numerical, not validation). The last
rule is the catch-all `unknown`.

To add a rule, insert a `Rule(...)` above the first rule that would otherwise swallow its
records, give it a `pattern` no other rule uses, and add a record that reaches it to
tests/test_diagnosis.py (the tests check that every rule is reachable).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MATCH_LIMIT = 4096
WITNESSED = ("oom", "walltime", "retired", "killed_worker")
CATEGORIES = ("oom", "walltime", "retired", "killed_worker", "timeout", "network",
              "dependency", "validation", "numerical", "interrupted", "lost", "signal",
              "unknown")


@functools.cache
def _regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One case-insensitive alternation of a rule's message regexes, compiled once."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Facts:
    """The fields of a failure record that rules look at, normalized so rules stay simple."""

    failure_class: str
    message: str
    reason: str
    signal: str | None
    exit_code: int | None
    hint: str | None


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One row of the table: criteria (any one suffices) and what to conclude from them."""

    category: str
    classes: tuple[str, ...] = ()
    class_prefixes: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()
    exit_codes: tuple[int, ...] = ()
    hints: tuple[str, ...] = ()
    fallback: bool = False
    retryable: bool
    pattern: str
    suggestion: str

    def __post_init__(self) -> None:
        """Reject malformed rows at import, where a typo is cheapest to find."""
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}")
        criteria = (self.classes, self.class_prefixes, self.messages, self.reasons,
                    self.signals, self.exit_codes, self.hints)
        if not self.fallback and not any(criteria):
            raise ValueError(f"rule {self.pattern!r} has no criteria and would never match")
        if not self.suggestion.strip() or "\n" in self.suggestion:
            raise ValueError(f"rule {self.pattern!r} needs a one-line suggestion")
        _regex(self.messages)

    def matches(self, facts: Facts) -> bool:
        """Whether any criterion of this rule holds for the record."""
        regex = _regex(self.messages)
        return (self.fallback
                or facts.hint in self.hints
                or facts.failure_class in self.classes
                or facts.failure_class.startswith(self.class_prefixes)
                or facts.reason in self.reasons
                or facts.signal in self.signals
                or facts.exit_code in self.exit_codes
                or (regex is not None and regex.search(facts.message) is not None))


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` concludes about one failure."""

    category: str
    retryable: bool
    pattern: str
    suggestion: str


_OOM_ADVICE = "Give the run more memory or use smaller batches/chunks; as is it fails again."
_NATIVE = ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE")
_KILLED = ("SIGKILL", "SIGTERM", "SIGHUP")

RULES: tuple[Rule, ...] = (
    Rule(category="oom", hints=("oom",),
         retryable=False, pattern="the caller says it ran out of memory",
         suggestion=_OOM_ADVICE),
    Rule(category="walltime", hints=("walltime",),
         retryable=True, pattern="its job's walltime ended, or the job was cancelled",
         suggestion="Resume it from its last checkpoint in a job with a longer walltime."),
    Rule(category="retired", hints=("retired",),
         retryable=True, pattern="its worker was retired on purpose (scale-down)",
         suggestion="Nothing was wrong with the task itself; rerun it."),
    Rule(category="killed_worker", hints=("killed_worker",),
         retryable=False, pattern="Dask gave up after the task's workers died (KilledWorker)",
         suggestion="Look at why its earlier attempts' workers died (memory, a native"
                    " crash) before rerunning it."),
    Rule(category="oom",
         classes=("MemoryError", "OutOfMemoryError", "ResourceExhaustedError"),
         messages=(r"out of memory", r"cannot allocate memory", r"std::bad_alloc",
                   r"\boom[- ]?kill"),
         retryable=False, pattern="out-of-memory error (host or GPU)",
         suggestion=_OOM_ADVICE),
    Rule(category="timeout", reasons=("timeout",),
         classes=("Timeout", "TimeoutError", "TimeoutExpired"),
         retryable=True, pattern="deadline exceeded or TimeoutError",
         suggestion="Rerun with a longer deadline, or find where it stalled from its last logs."),
    Rule(category="interrupted", classes=("Interrupted",),
         retryable=True, pattern="was running when runnerd or the machine went down",
         suggestion="Relaunch it from its last checkpoint: runnerctl resume --interrupted."),
    Rule(category="interrupted", reasons=("abandoned",),
         classes=("KeyboardInterrupt", "Terminated", "Cancelled", "CancelledError"),
         signals=("SIGINT",), exit_codes=(130, -2),
         retryable=True, pattern="interrupted, terminated or cancelled",
         suggestion="It was stopped from outside (Ctrl-C, SIGTERM, cancel, preemption); rerun it."),
    Rule(category="lost", reasons=("lost",), classes=("HeartbeatLost",),
         retryable=True, pattern="heartbeats stopped past the grace period",
         suggestion="Check the host and the process were alive and not hung, then rerun."),
    Rule(category="signal", signals=_NATIVE,
         exit_codes=(132, 134, 135, 136, 139, -4, -6, -7, -8, -11),
         retryable=False, pattern="native crash (SIGSEGV/SIGABRT/SIGBUS/SIGILL/SIGFPE)",
         suggestion="A native crash repeats: read crash.log for the stack, suspect extensions."),
    Rule(category="signal", signals=_KILLED, exit_codes=(129, 137, 143, -1, -9, -15),
         retryable=True, pattern="killed from outside (SIGKILL/SIGTERM/SIGHUP)",
         suggestion="Likely preempted; check dmesg for an OOM kill before simply rerunning."),
    Rule(category="signal", class_prefixes=("Signal:",),
         retryable=False, pattern="ended by another signal",
         suggestion="Read the run's crash.log to see what raised the signal before rerunning."),
    Rule(category="signal", classes=("ProcessExited",),
         retryable=True, pattern="process exited without reporting",
         suggestion="Read the run's crash.log and the kernel log (dmesg) for an OOM kill."),
    Rule(category="network",
         classes=("ConnectionError", "ConnectionResetError", "ConnectionRefusedError",
                  "ConnectionAbortedError", "BrokenPipeError", "RemoteDisconnected",
                  "IncompleteRead"),
         messages=(r"connection (?:reset|refused|aborted)", r"broken pipe",
                   r"network is unreachable", r"no route to host",
                   r"remote end closed connection"),
         retryable=True, pattern="connection dropped or refused",
         suggestion="Likely transient: rerun, with retries and backoff around the remote call."),
    Rule(category="network", classes=("gaierror", "herror"),
         messages=(r"temporary failure in name resolution", r"name or service not known",
                   r"nodename nor servname", r"getaddrinfo failed"),
         retryable=True, pattern="DNS lookup failed",
         suggestion="Check the host name and the node's DNS, then rerun."),
    Rule(category="network",
         classes=("MaxRetryError", "NewConnectionError", "ProtocolError", "ReadTimeout",
                  "ConnectTimeout", "ReadTimeoutError", "ConnectTimeoutError",
                  "ChunkedEncodingError", "ClientConnectorError", "ServerDisconnectedError"),
         retryable=True, pattern="HTTP client gave up (urllib3/requests/aiohttp)",
         suggestion="Likely transient: rerun, with retries and backoff around the remote call."),
    Rule(category="network",
         messages=(r"\b5\d\d (?:server error|internal server error|bad gateway"
                   r"|service unavailable|gateway time-?out)\b",
                   r"\b(?:http|status(?:[ _]code)?)(?: error)?[:=]? ?5\d\d\b",
                   r"service unavailable", r"bad gateway", r"too many requests"),
         retryable=True, pattern="server busy or down (HTTP 5xx/429)",
         suggestion="The remote service was failing; rerun later, with backoff."),
    Rule(category="timeout", messages=(r"\btimed out\b", r"\bdeadline exceeded\b"),
         retryable=True, pattern="'timed out' in the message",
         suggestion="Rerun; if it recurs, raise the timeout or find what it waited on."),
    Rule(category="dependency", classes=("ModuleNotFoundError", "ImportError"),
         messages=(r"no module named", r"cannot import name", r"undefined symbol",
                   r"cannot open shared object file", r"dll load failed"),
         retryable=False, pattern="missing or mismatched package",
         suggestion="Install or pin the package named in the message in the run's environment."),
    Rule(category="numerical",
         classes=("FloatingPointError", "ZeroDivisionError", "OverflowError"),
         messages=(r"\b(?:nan|inf)\b", r"non-?finite", r"division by zero",
                   r"overflow encountered"),
         retryable=False, pattern="NaN/inf or arithmetic error",
         suggestion="Lower the learning rate, clip gradients or check inputs for NaN/inf."),
    Rule(category="validation",
         classes=("ValueError", "TypeError", "KeyError", "AssertionError", "FileNotFoundError",
                  "NotADirectoryError", "IsADirectoryError", "JSONDecodeError",
                  "UnicodeDecodeError", "ValidationError"),
         messages=(r"\binvalid\b", r"\bexpected\b.{0,200}?\bgot\b",
                   r"no such file or directory"),
         retryable=False, pattern="bad input, config or parameter",
         suggestion="Fix the input, config or parameter the message names; a rerun as is fails."),
    Rule(category="unknown", fallback=True,
         retryable=False, pattern="no rule matched",
         suggestion="Read the traceback (runnerctl show); add a rule here if it recurs."),
)


def _check_table(rules: tuple[Rule, ...]) -> None:
    """Keep the table's invariants: one catch-all, last; patterns tell rules apart."""
    if not rules[-1].fallback or any(rule.fallback for rule in rules[:-1]):
        raise ValueError("the table must end with exactly one fallback rule")
    if len({rule.pattern for rule in rules}) != len(rules):
        raise ValueError("two rules share a pattern")


_check_table(RULES)


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


def _facts(record: Mapping[str, Any], category_hint: str | None) -> Facts:
    """What rules match against; a qualified class 'pkg.mod.Error' counts as 'Error'."""
    failure_class = _text(record.get("failure_class"))
    if not failure_class.startswith("Signal:"):
        failure_class = failure_class.rsplit(".", 1)[-1]
    return Facts(
        failure_class=failure_class,
        message=_text(record.get("message"))[:MATCH_LIMIT],  # rules read the head (BUG-2)
        reason=_text(record.get("reason")).lower(),
        signal=_signal_name(record.get("signal"), failure_class),
        exit_code=_exit_code(record.get("exit_code")),
        hint=_text(category_hint).lower() or None,
    )


def match_rule(record: Mapping[str, Any], category_hint: str | None = None) -> Rule:
    """The first rule of `RULES` that matches the record (the catch-all if none does)."""
    found = _facts(record, category_hint)
    return next((rule for rule in RULES if rule.matches(found)), RULES[-1])


def diagnose(record: Mapping[str, Any], category_hint: str | None = None) -> Diagnosis:
    """Category, retryability and advice for a failure record of SPEC §3.

    `category_hint="oom"` is how a caller that knows more (e.g. dmesg showed the OOM
    killer) turns a bare SIGKILL into oom; the record alone never makes that leap.
    """
    rule = match_rule(record, category_hint)
    return Diagnosis(rule.category, rule.retryable, rule.pattern, rule.suggestion)


def _witnessed(record: Mapping[str, Any]) -> str | None:
    """A stored category only a witness can give (a hint): kept when re-diagnosing."""
    category = record.get("category")
    return category if category in WITNESSED else None


def findings(records: list[Mapping[str, Any]], examples: int = 5) -> list[dict[str, Any]]:
    """Failure records grouped by the rule that explains them, most frequent first."""
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        rule = match_rule(record, _witnessed(record))
        group = groups.setdefault(rule.pattern, {
            "category": rule.category, "pattern": rule.pattern, "retryable": rule.retryable,
            "suggestion": rule.suggestion, "count": 0, "run_ids": [],
            "example": {"failure_class": record.get("failure_class"),
                        "message": record.get("message")},
        })
        group["count"] += 1
        if len(group["run_ids"]) < examples:
            group["run_ids"].append(record.get("run_id"))
    return sorted(groups.values(), key=lambda g: -g["count"])
