"""Failure records: the signature that groups one bug across many runs (SPEC §3)."""

from __future__ import annotations

import hashlib
import re

_NORMALIZERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(['\"]).*?\1"), "<str>"),
    (re.compile(r"(?:/[\w.\-+@~]+)+/?"), "<path>"),
    (re.compile(r"0x[0-9a-fA-F]+"), "<hex>"),
    (re.compile(r"\b[0-9a-fA-F]{8,}\b"), "<hex>"),
    (re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"), "<num>"),
)
# `[ \t]*`, not `\s*`: with re.M, `^\s*` rescans every following newline from each line
# start, quadratic in a traceback of blank lines (BUG-1).
_FRAME = re.compile(r'^[ \t]*File "(?P<file>[^"\n]+)", line \d+, in (?P<func>\S+)', re.M)
TOP_FRAMES = 3
MATCH_LIMIT = 4096  # the head of a message that is normalized
TRACEBACK_LIMIT = 1 << 16  # the tail of a traceback searched for frames


def normalize_message(message: str) -> str:
    """The message with run-specific values (numbers, ids, paths, quotes) masked."""
    for pattern, token in _NORMALIZERS:
        message = pattern.sub(token, message)
    return " ".join(message.split())


def top_frames(traceback: str | None, count: int = TOP_FRAMES) -> list[str]:
    """The innermost `count` frames as 'file:function', without line numbers."""
    matches = _FRAME.finditer((traceback or "")[-TRACEBACK_LIMIT:])
    frames = [f"{m['file'].rsplit('/', 1)[-1]}:{m['func']}" for m in matches]
    return frames[-count:]


def signature(failure_class: str, message: str, traceback: str | None) -> str:
    """A stable 16-hex-digit hash of class, normalized message and top frames."""
    parts = [failure_class, normalize_message(message[:MATCH_LIMIT]), *top_frames(traceback)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
