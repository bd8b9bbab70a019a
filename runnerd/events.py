"""The live event stream behind `subscribe`: every committed change, to every subscriber.

Events come from the persisted event log, so each carries its `seq`, and a
subscriber that passes `since=N` first gets everything after N from the log. A slow
subscriber never slows anyone: events go straight to its transport's buffer, and
while that holds more than `MAX_BUFFERED` bytes its events are dropped and counted;
it then gets one `lagged` event (with the last seq it did get) and can re-sync.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from runnerd.registry import BatchResult, Registry, Store

MAX_BUFFERED = 1 << 20
MAX_PENDING = 10_000
BACKLOG_PAGE = 5_000

Event = dict[str, Any]


class Subscriber:
    """One subscribed connection: its filter, its position and what it missed."""

    def __init__(self, send: Callable[[Event], None], buffered: Callable[[], int],
                 run_id: str | None = None, experiment: str | None = None) -> None:
        self.send, self.buffered = send, buffered
        self.run_id, self.experiment = run_id, experiment
        self.last_seq = 0
        self.dropped = 0
        self.live = False
        self.pending: list[Event] = []

    def matches(self, event: Event) -> bool:
        return (self.run_id is None or event["run_id"] == self.run_id) and \
            (self.experiment is None or event["experiment"] == self.experiment)

    def offer(self, event: Event) -> None:
        """A committed event: delivered now, or held while the backlog is being sent."""
        if not self.matches(event):
            return
        if self.live:
            self.deliver(event)
        elif len(self.pending) < MAX_PENDING:
            self.pending.append(event)
        else:
            self.dropped += 1

    def deliver(self, event: Event) -> None:
        if event["seq"] <= self.last_seq:
            return
        if self.buffered() > MAX_BUFFERED:
            self.dropped += 1
            return
        self.report_lag()
        self.send(event)
        self.last_seq = event["seq"]

    def report_lag(self) -> None:
        """Tell the subscriber what it missed (called again when its buffer drains)."""
        if self.dropped and self.buffered() <= MAX_BUFFERED:
            self.send({"event": "lagged", "dropped": self.dropped, "seq": self.last_seq})
            self.dropped = 0


class Broker:
    """Fans committed events out to the subscribers."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.subscribers: set[Subscriber] = set()

    def on_commit(self, result: BatchResult) -> None:
        for event in result.effects.events:
            for subscriber in list(self.subscribers):
                subscriber.offer(event)

    async def subscribe(self, subscriber: Subscriber, since: int | None) -> None:
        """Start the stream: the backlog after `since` from the log, then live events."""
        self.subscribers.add(subscriber)
        if since is None:
            subscriber.last_seq = await self.registry.read(lambda s: s.last_event())
        else:
            subscriber.last_seq = since
            await self._send_backlog(subscriber)
        for event in subscriber.pending:
            subscriber.deliver(event)
        subscriber.pending = []
        subscriber.live = True

    async def _send_backlog(self, subscriber: Subscriber) -> None:
        while True:
            page = await self.registry.read(partial(
                _page, after=subscriber.last_seq, run_id=subscriber.run_id,
                experiment=subscriber.experiment))
            for event in page:
                subscriber.deliver(event)
            if len(page) < BACKLOG_PAGE or subscriber.dropped:
                return

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)


def _page(store: Store, after: int, run_id: str | None, experiment: str | None) -> list[Event]:
    return store.events_after(after, run_id, experiment, BACKLOG_PAGE)
