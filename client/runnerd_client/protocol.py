"""Wire protocol version 1, the one module both the daemon and the client import.

Frames (`framing`) are a 4-byte big-endian length followed by one msgpack map. Requests
are frozen dataclasses, one per operation, and what each field may hold is declared
beside it (`fields`: closed sets, ranges, patterns); `decode_request` is the only place
where a wire map becomes a typed request, so every field is checked exactly once.
"""

from __future__ import annotations

from typing import Any

from runnerd_client.enums import (
    ACTIVE_STATES,
    ExportWhat,
    FailReason,
    GroupBy,
    LabelCategory,
    State,
    SweepPolicy,
    SweepStatus,
)
from runnerd_client.errors import ErrorCode, RunnerdError
from runnerd_client.fields import decode_fields, field_specs
from runnerd_client.framing import (
    DEFAULT_MAX_FRAME,
    HEADER,
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    MAX_ITEMS,
    LimitExceeded,
    check_shape,
    error_reply,
    frame,
    ok_reply,
    raise_for_reply,
    unpack_body,
    unpack_request,
)
from runnerd_client.messages import (
    REQUESTS,
    Artifact,
    Attach,
    Cancel,
    Checkpoint,
    Create,
    Detach,
    Export,
    Fail,
    Failures,
    Get,
    Heartbeat,
    Hello,
    HookList,
    Label,
    ListRuns,
    Mutation,
    Prune,
    Request,
    Start,
    Status,
    Subscribe,
    Succeed,
    SweepCells,
    SweepCreate,
    SweepEnd,
    SweepGet,
    SweepList,
    SweepMutation,
    SweepStart,
    Unwatch,
    Watch,
)

__all__ = [  # what this module passes on from the modules it was split into
    "ACTIVE_STATES",
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "REQUESTS",
    "Artifact",
    "Attach",
    "Cancel",
    "Checkpoint",
    "Create",
    "Detach",
    "ErrorCode",
    "Export",
    "ExportWhat",
    "Fail",
    "FailReason",
    "Failures",
    "Get",
    "GroupBy",
    "Heartbeat",
    "Hello",
    "HookList",
    "Label",
    "LabelCategory",
    "LimitExceeded",
    "ListRuns",
    "Mutation",
    "Prune",
    "Request",
    "RunnerdError",
    "Start",
    "State",
    "Status",
    "Subscribe",
    "Succeed",
    "SweepCells",
    "SweepCreate",
    "SweepEnd",
    "SweepGet",
    "SweepList",
    "SweepMutation",
    "SweepPolicy",
    "SweepStart",
    "SweepStatus",
    "Unwatch",
    "Watch",
    "check_shape",
    "error_reply",
    "frame",
    "ok_reply",
    "raise_for_reply",
    "unpack_body",
    "unpack_request",
]

PROTOCOL_VERSION = 1


# --- decoding and encoding ----------------------------------------------------------


def decode_request(msg: dict[Any, Any]) -> tuple[int | None, Request]:
    """Turn a wire map into (id, typed request); raise RunnerdError when it is not one."""
    req_id = msg.get("id")
    if req_id is not None and (type(req_id) is not int or not INT64_MIN <= req_id <= INT64_MAX):
        raise RunnerdError(
            ErrorCode.BAD_REQUEST, "field 'id' must be an integer that fits in a signed 64-bit int"
        )
    op = msg.get("op")
    if not isinstance(op, str):
        raise RunnerdError(ErrorCode.BAD_REQUEST, "field 'op' is missing or not a string")
    cls = REQUESTS.get(op)
    if cls is None:
        raise RunnerdError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")
    return req_id, cls(**decode_fields(op, field_specs(cls), msg))


def request_map(req: Request) -> dict[str, Any]:
    """A request as a wire map without an id; fields left at None are not sent."""
    msg: dict[str, Any] = {"op": req.op}
    for spec in field_specs(type(req)):
        value = getattr(req, spec.name)
        if value is not None:
            msg[spec.name] = value
    return msg


def encode_request(req_id: int, req: Request) -> bytes:
    """Frame a request with its id."""
    return frame({**request_map(req), "id": req_id})
