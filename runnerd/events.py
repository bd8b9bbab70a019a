"""The live event stream behind `subscribe`: every committed change, to every subscriber.

Events come from the persisted event log, so each carries its `seq`, and a
subscriber that passes `since=N` first gets everything after N from the log. A slow
subscriber never slows anyone: events go straight to its transport's buffer, and
while that holds more than `MAX_BUFFERED` bytes its events are dropped and counted;
it then gets one `lagged` event (with the last seq it did get) and can re-sync.

Each event is encoded once per commit, not once per subscriber, and a subscriber gets
all of a batch's events in one write: one syscall (and one wake-up of the subscriber)
per subscriber per batch, whatever the batch holds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from runnerd.registry import BatchResult, Registry, Store
from runnerd_client.protocol import frame

MAX_BUFFERED = 1 << 20
MAX_PENDING = 10_000
BACKLOG_PAGE = 5_000

Event = dict[str, Any]
Framed = tuple[Event, bytes]  # an event and its encoded frame


class Subscriber:
    """One subscribed connection: its filter, its position and what it missed."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        buffered: Callable[[], int],
        run_id: str | None = None,
        experiment: str | None = None,
        sweep_id: str | None = None,
    ) -> None:
        self.write, self.buffered = write, buffered
        self.run_id, self.experiment, self.sweep_id = run_id, experiment, sweep_id
        self.last_seq = 0
        self.dropped = 0
        self.live = False
        self.pending: list[Framed] = []

    def matches(self, event: Event) -> bool:
        return (
            (self.run_id is None or event["run_id"] == self.run_id)
            and (self.experiment is None or event["experiment"] == self.experiment)
            and (self.sweep_id is None or event["sweep_id"] == self.sweep_id)
        )

    def offer(self, events: list[Framed]) -> None:
        """A batch's committed events: delivered now, or held while the backlog is sent."""
        mine = [framed for framed in events if self.matches(framed[0])]
        if not mine:
            return
        if self.live:
            self.deliver(mine)
            return
        room = max(MAX_PENDING - len(self.pending), 0)
        self.pending += mine[:room]
        self.dropped += len(mine) - len(mine[:room])

    def deliver(self, events: list[Framed]) -> None:
        """Write the events not yet sent in one go; drop (and count) those that find more
        than MAX_BUFFERED bytes waiting, counting what this write adds."""
        out: list[bytes] = []
        size = self.buffered()
        for event, data in events:
            if event["seq"] <= self.last_seq:
                continue
            if size > MAX_BUFFERED:
                self.dropped += 1
                continue
            if self.dropped:
                out.append(self._lag_frame())
            out.append(data)
            size += len(data)
            self.last_seq = event["seq"]
        if out:
            self.write(b"".join(out))

    def report_lag(self) -> None:
        """Tell the subscriber what it missed (called again when its buffer drains)."""
        if self.dropped and self.buffered() <= MAX_BUFFERED:
            self.write(self._lag_frame())

    def _lag_frame(self) -> bytes:
        data = frame({"event": "lagged", "dropped": self.dropped, "seq": self.last_seq})
        self.dropped = 0
        return data


class Broker:
    """Fans committed events out to the subscribers."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.subscribers: set[Subscriber] = set()

    def on_commit(self, result: BatchResult) -> None:
        if not self.subscribers or not result.effects.events:
            return
        framed = [(event, frame(event)) for event in result.effects.events]
        for subscriber in list(self.subscribers):
            subscriber.offer(framed)

    async def subscribe(self, subscriber: Subscriber, since: int | None) -> None:
        """Start the stream: the backlog after `since` from the log, then live events."""
        self.subscribers.add(subscriber)
        if since is None:
            subscriber.last_seq = await self.registry.read(lambda s: s.events.last_seq())
        else:
            subscriber.last_seq = since
            await self._send_backlog(subscriber)
        subscriber.deliver(subscriber.pending)
        subscriber.pending = []
        subscriber.live = True

    async def _send_backlog(self, subscriber: Subscriber) -> None:
        while True:
            page = await self.registry.read(
                partial(
                    _page,
                    after=subscriber.last_seq,
                    run_id=subscriber.run_id,
                    experiment=subscriber.experiment,
                    sweep_id=subscriber.sweep_id,
                )
            )
            subscriber.deliver([(event, frame(event)) for event in page])
            if len(page) < BACKLOG_PAGE or subscriber.dropped:
                return

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)


def _page(
    store: Store, after: int, run_id: str | None, experiment: str | None, sweep_id: str | None
) -> list[Event]:
    return store.events.after(after, run_id, experiment, sweep_id, BACKLOG_PAGE)
