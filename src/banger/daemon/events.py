"""The daemon's event bus: services publish, `daemon.events` subscribers receive, each through a bounded queue.

A slow subscriber never makes the daemon grow or wait: when its queue is full, further events are dropped and
counted in one `{"type": "lost", "count": N}` marker where they would have been.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from banger.progress import Progress, ProgressEvent

QUEUE_MAX = 1024


class Subscription:
    """One subscriber's bounded queue of events."""

    def __init__(self, maxlen: int) -> None:
        self._items: deque[dict[str, Any]] = deque()
        self._maxlen = maxlen
        self._ready = asyncio.Event()

    def put(self, event: dict[str, Any]) -> None:
        """Queue an event; when the queue is full, count it in a `lost` marker at the queue's end instead."""
        if len(self._items) >= self._maxlen:
            # One slot past the bound holds the marker, so the reader sees the gap where it happened.
            if self._items[-1].get("type") == "lost":
                self._items[-1]["count"] += 1
            else:
                self._items.append({"type": "lost", "count": 1, "time": time.time()})
        else:
            self._items.append(event)
        self._ready.set()

    async def get(self) -> dict[str, Any]:
        """The next event (or `lost` marker)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class EventBus:
    """Fan-out of daemon events (VM state, long-operation progress, session output) to subscribers."""

    def __init__(self, queue_max: int = QUEUE_MAX) -> None:
        self._subs: set[Subscription] = set()
        self._queue_max = queue_max

    def publish(self, type_: str, **fields: Any) -> None:
        """Send an event of `type_` to every subscriber; never blocks."""
        event = {"type": type_, "time": time.time(), **fields}
        for sub in self._subs:
            sub.put(event)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A subscription that lasts for the `with` block."""
        sub = Subscription(self._queue_max)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def progress_tee(self, progress: Progress, *, op: str, name: str) -> Progress:
        """A Progress callback that also publishes each report as an `op.progress` event."""

        def tee(event: ProgressEvent) -> None:
            progress(event)
            self.publish("op.progress", op=op, name=name, **event.to_json())

        return tee

    @contextlib.contextmanager
    def operation(self, op: str, name: str) -> Iterator[None]:
        """Publish `op.start` now and `op.done` (with the error, if any) when the block ends."""
        self.publish("op.start", op=op, name=name)
        try:
            yield
        except BaseException as exc:
            self.publish("op.done", op=op, name=name, ok=False, error=str(exc) or type(exc).__name__)
            raise
        self.publish("op.done", op=op, name=name, ok=True, error=None)
