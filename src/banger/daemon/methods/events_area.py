"""daemon.events: a subscription to the daemon's event bus, streamed as `$/event` notifications until cancelled."""

from __future__ import annotations

import time
from typing import Any

from banger.daemon.app import App
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    @reg.method("daemon.events")
    async def events(ctx: CallContext) -> dict[str, Any]:
        """Stream events (VM state, operation progress, session output) as `$/event` until cancelled."""
        with app.events.subscribe() as sub:
            ctx.event({"event": {"type": "subscribed", "time": time.time()}})
            while True:
                # send_event waits for the socket to drain: a slow client fills its own bounded queue, not ours.
                await ctx.send_event({"event": await sub.get()})
