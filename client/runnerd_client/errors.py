"""The closed set of wire error codes and the one exception that carries them (SPEC §4)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The closed set of error codes a reply may carry (SPEC §4)."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_RUN = "unknown_run"
    INVALID_TRANSITION = "invalid_transition"
    VERSION_MISMATCH = "version_mismatch"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class RunnerdError(Exception):
    """An error with a wire code: raised by the daemon's logic, re-raised by clients."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RunRefused(RunnerdError):
    """The daemon, reachable, refused to create, start or attach a run (`bad_request`,
    `conflict`, ...): the run is not tracked, so the call raises rather than let the
    experiment go on believing it is. (A daemon that cannot be reached refuses nothing:
    the events are spooled and replayed.)"""

    def __init__(self, code: ErrorCode | str, message: str, run_id: str) -> None:
        super().__init__(code, message)
        self.run_id = run_id
