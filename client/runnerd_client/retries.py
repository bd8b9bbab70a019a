"""When a failed attempt is tried again: `rd.retrying`, a sweep's cells, `runnerctl exec
--retries` and the hooks' redelivery share one policy and one backoff."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from runnerd_client.enums import RetryOn
from runnerd_client.fields import Backoff, RetryCount, RetryWhen, check_fields


def worth_retrying(diagnosis: dict[str, Any] | None, retry_on: str) -> bool:
    """Under retry_on="retryable", only a failure the daemon diagnosed retryable (a bug or
    a bad input fails at once); under "any", every failure."""
    return retry_on == RetryOn.ANY or bool((diagnosis or {}).get("retryable"))


def backoff_delay(backoff: float, attempt: int) -> float:
    """Seconds before the retry after `attempt`: backoff ** attempt, with ±25% jitter so
    that many runs failing together do not retry together."""
    return float(backoff**attempt * random.uniform(0.75, 1.25))


@dataclass(frozen=True)
class Retries:
    """When a failed attempt is tried again (`rd.retrying`, `runnerctl exec --retries`): at
    most `retries` times, after `backoff ** attempt` seconds, and under `retry_on` only
    failures diagnosed retryable. A value out of bounds raises TypeError or ValueError."""

    retries: RetryCount = 0
    backoff: Backoff = 2.0
    retry_on: RetryWhen = RetryOn.RETRYABLE

    def __post_init__(self) -> None:
        check_fields(self)
