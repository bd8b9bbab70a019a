"""Client-made run ids: time-ordered, with a random part, URL-safe (SPEC §2)."""

from __future__ import annotations

import re
import secrets
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
RUN_ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


def new_run_id(now: float | None = None) -> str:
    """16 Crockford base32 characters: 48 bits of milliseconds, then 32 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    return _base32(millis, 10) + _base32(secrets.randbits(30), 6)


def new_key() -> str:
    """An idempotency key: unique per event, never reused. Time-ordered like a run id (48
    bits of milliseconds, then 60 random bits): the registry's index of keys then grows at
    one end, and a batch of events writes a few of its pages instead of one per key."""
    millis = int(time.time() * 1000)
    return _base32(millis, 10) + _base32(secrets.randbits(60), 12)


def is_valid_run_id(run_id: str) -> bool:
    return RUN_ID_PATTERN.fullmatch(run_id) is not None
