"""What the handlers of every verb share: refusals, JSON values, event times, and the one
way to queue an idempotent mutation."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from runnerd.handlers.context import Context, Reply
from runnerd.registry import Store
from runnerd_client.protocol import (
    ErrorCode,
    Mutation,
    RunnerdError,
    SweepMutation,
    request_map,
)

MAX_DEPTH = 64


def bad(message: str) -> RunnerdError:
    return RunnerdError(ErrorCode.BAD_REQUEST, message)


def event_time(at: float | None) -> float:
    """The client's time of the event (kept when replayed from a spool), never in the future."""
    now = time.time()
    return now if at is None or at <= 0 or at > now else float(at)


def _depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and maps nest, counted only up to just past `limit`."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def as_json(value: Any, what: str) -> str:
    """A client's value (params, tags, data...) as the JSON text kept; refused if it is not
    plain JSON."""
    if _depth(value) > MAX_DEPTH:
        raise bad(f"{what} nests deeper than {MAX_DEPTH} levels")
    try:
        return json.dumps(value if value is not None else {}, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise bad(f"{what} must be JSON-able and not too deeply nested: {exc}") from None


def _payload_digest(req: Mutation | SweepMutation) -> str:
    """What an idempotency key stands for: every field of the request but the key itself and
    the event's time (a spooled event is replayed with the time it happened)."""
    payload = {k: v for k, v in request_map(req).items() if k not in ("key", "at")}
    try:
        text = json.dumps(payload, sort_keys=True, default=repr, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        raise bad(f"{req.op}: fields must be JSON-able and not too deeply nested") from None
    return hashlib.sha256(text.encode()).hexdigest()


def mutate(
    ctx: Context, req: Mutation | SweepMutation, apply: Callable[[Store, float], Reply]
) -> Awaitable[Reply]:
    """Queue an idempotent mutation: a replayed key answers the first reply, changes nothing;
    the same key with other fields is a `conflict`."""
    at = event_time(req.at)
    digest = _payload_digest(req)

    def op(store: Store) -> Reply:
        first = store.upkeep.replayed(req.key, req.op, req.subject, digest)
        if first is not None:
            return first
        reply = apply(store, at)
        store.upkeep.remember(req.key, req.op, req.subject, reply, at, digest)
        return reply

    return ctx.registry.submit(op)
