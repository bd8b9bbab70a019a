"""Frames on the wire: a 4-byte big-endian length, then one msgpack map; the bounds a
request's size and shape must keep (README, "Connection limits"); and the one place a typed
reply (`runnerd_client.replies`) becomes a map: `fields_of`, which the packer, and the
daemon's JSON writers (idempotent replies, manifest.json), call for each one they meet."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any

import msgpack

from runnerd_client.errors import ErrorCode, RunnerdError

DEFAULT_MAX_FRAME = 1 << 20
MAX_ITEMS = 10_000
"""Map entries plus list items a request may hold in all: decoding costs 1-2 µs each on
the daemon's event loop, so this bounds what one frame can cost everyone else."""
MAX_DEPTH = 64
"""How deeply a request's values may nest (its fields are at depth 1)."""
HEADER = struct.Struct(">I")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# --- framing and replies ----------------------------------------------------


def frame(msg: dict[str, Any]) -> bytes:
    """Pack one map into a length-prefixed frame."""
    body: bytes = msgpack.packb(msg, use_bin_type=True, default=fields_of)
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    """Decode a frame body; raise RunnerdError(bad_frame) if it is not msgpack."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise RunnerdError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}") from None


class LimitExceeded(RunnerdError):
    """A request refused for its size or shape; `req_id` is its id, if it had one."""

    def __init__(self, req_id: int | None, message: str) -> None:
        super().__init__(ErrorCode.BAD_REQUEST, message)
        self.req_id = req_id


class _Counted(Exception):
    """Raised from msgpack's hooks to stop decoding a request that holds too many items."""


def _counting_hook(max_items: int) -> Callable[[Any], Any]:
    """A hook msgpack calls with each map and list it builds, bottom up: it stops the
    decoding once they hold more than `max_items` items in all."""
    seen = 0

    def hook(container: Any) -> Any:
        nonlocal seen
        seen += len(container)
        if seen > max_items:
            raise _Counted
        return container

    return hook


def unpack_request(body: bytes, max_items: int = MAX_ITEMS) -> dict[Any, Any]:
    """Decode a request frame's body like `unpack_body`, into a map. A request of more than
    `max_items` items is refused (LimitExceeded) as soon as that many are built, at most
    twice `max_items`: one map or list that large is refused before it is built, and a
    body too short to hold that many (items take a byte at least) is not counted."""
    hook = _counting_hook(max_items) if len(body) > max_items else None
    try:
        msg = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            max_map_len=max_items,
            max_array_len=max_items,
            object_hook=hook,
            list_hook=hook,
        )
    except (ValueError, _Counted) as exc:
        if (isinstance(exc, _Counted) or "exceeds max_" in str(exc)) and _whole_map(body):
            raise LimitExceeded(_scan_id(body), _too_many(max_items)) from None
        raise RunnerdError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise RunnerdError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}") from None
    if not isinstance(msg, dict):
        raise RunnerdError(ErrorCode.BAD_FRAME, "a frame must hold a msgpack map")
    return msg


def check_shape(
    msg: dict[Any, Any], req_id: int | None, max_items: int = MAX_ITEMS, max_depth: int = MAX_DEPTH
) -> None:
    """Refuse (LimitExceeded) a request whose maps and lists hold more than `max_items`
    items in all, or nest deeper than `max_depth`."""
    shape = _shape_error(msg, max_items, max_depth)
    if shape == "items":
        raise LimitExceeded(req_id, _too_many(max_items))
    if shape == "depth":
        raise LimitExceeded(
            req_id, f"a request's values nest at most {max_depth} levels (max_depth)"
        )


def _too_many(max_items: int) -> str:
    return f"a request holds at most {max_items} map entries and list items in all (max_items)"


def _valid_id(value: Any) -> bool:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _whole_map(body: bytes) -> bool:
    """Whether `body` is exactly one well-formed map, checked by skipping through it in C
    (nothing is built): a lying length header is bad msgpack, not a big request."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(body), 1))
    unpacker.feed(body)
    try:
        for _ in range(2 * unpacker.read_map_header()):
            unpacker.skip()
    except Exception:  # msgpack raises several unrelated exception types
        return False
    return bool(unpacker.tell() == len(body))


def _scan_id(body: bytes) -> int | None:
    """The top-level `id` of a frame refused before it was built, found by skipping the
    other fields (in C, without building them), so the error can answer that request."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(body))
    unpacker.feed(body)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "id":
                value = unpacker.unpack()
                return value if _valid_id(value) else None
            unpacker.skip()
    except Exception:  # msgpack raises several unrelated exception types
        return None
    return None


_CONTAINERS = (dict, list)
"""A tuple, not `dict | list`: isinstance takes it faster, and this runs on every request."""


def _shape_error(value: Any, max_items: int, max_depth: int) -> str | None:
    """'items' or 'depth' when `value`'s maps and lists hold too many items in all or nest
    too deeply (walked without recursion); None when they are within bounds."""
    if not isinstance(value, _CONTAINERS):
        return None
    children = value.values() if isinstance(value, dict) else value
    nested = [child for child in children if isinstance(child, _CONTAINERS)]
    if not nested:  # most requests
        return "items" if len(value) > max_items else None
    items = len(value)
    if items > max_items:
        return "items"
    stack = [(child, 1) for child in nested]  # the walk goes on as if `value` was popped
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return "depth"
        items += len(node)
        if items > max_items:
            return "items"
        children = node.values() if isinstance(node, dict) else node
        stack.extend([(child, depth + 1) for child in children if isinstance(child, _CONTAINERS)])
    return None


def ok_reply(req_id: int | None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": req_id, "ok": True, **(data or {})}


def error_reply(req_id: int | None, code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": {"code": str(code), "message": message}}


def raise_for_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """Return an ok reply as is; raise the RunnerdError an error reply carries."""
    if reply.get("ok"):
        return reply
    error = reply.get("error") or {}
    raise RunnerdError(str(error.get("code", "internal")), str(error.get("message", "")))


# --- typed replies as maps ---------------------------------------------------------


_KEYS: dict[type, tuple[tuple[str, str], ...]] = {}


def wire_keys(cls: type) -> tuple[tuple[str, str], ...]:
    """(attribute, wire key) of each field; a trailing '_' (`from_`) is not sent."""
    keys = _KEYS.get(cls)
    if keys is None:
        keys = _KEYS[cls] = tuple((f.name, f.name.rstrip("_")) for f in fields(cls))
    return keys


def fields_of(value: Any) -> dict[str, Any]:
    """One reply object as a map (its values as they are): msgpack's and json's `default`."""
    if not is_dataclass(value) or isinstance(value, type):
        raise TypeError(f"cannot encode {type(value).__name__}")
    return {key: getattr(value, name) for name, key in wire_keys(type(value))}


def as_map(value: Any) -> Any:
    """A reply (or any value holding reply objects) as plain maps and lists."""
    if isinstance(value, dict):
        return {key: as_map(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_map(item) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return as_map(fields_of(value))
    return value
