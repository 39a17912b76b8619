"""daemon.events: a subscription to the daemon's event bus, streamed as `$/event` notifications until cancelled."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from banger.daemon.app import App
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext

# How long (in 50 ms steps) an event of a VM without an owner record waits for it.
OWNER_WAIT_STEPS = 40


def register(reg: MethodRegistry, app: App) -> None:
    @reg.method("daemon.events")
    async def events(ctx: CallContext) -> dict[str, Any]:
        """Stream events (VM state, operation progress, session output) as `$/event` until cancelled. A caller
        other than root sees the events of its own VMs only (and the host-wide ones: kernels, images)."""
        visible = Visibility(app, ctx.caller.uid) if not ctx.caller.is_root else None
        with app.events.subscribe() as sub:
            ctx.event({"event": {"type": "subscribed", "time": time.time()}})
            while True:
                event = await sub.get()
                if visible is not None and not await visible(event):
                    continue
                # send_event waits for the socket to drain: a slow client fills its own bounded queue, not ours.
                await ctx.send_event({"event": event})


class Visibility:
    """Which VM events one user may see: those of the VMs it owns. It remembers them, so the removal of one (whose
    owner row went with it) still reaches its owner."""

    def __init__(self, app: App, uid: int) -> None:
        self.app = app
        self.uid = uid
        self.mine = app.owners.owned_by(uid)

    async def __call__(self, event: dict[str, Any]) -> bool:
        vm_id = event.get("vm_id")
        if not isinstance(vm_id, str):
            return True
        if vm_id in self.mine:
            return True
        # A VM's creation is announced a moment before its owner is recorded: wait a little for the record. Any
        # other VM without one belongs to root (made before owners existed).
        steps = OWNER_WAIT_STEPS if event.get("type") == "vm.created" else 1
        for step in range(steps):
            owner = self.app.owners.recorded(vm_id)
            if owner is not None:
                if owner == self.uid:
                    self.mine.add(vm_id)
                return owner == self.uid
            if step + 1 < steps:
                await asyncio.sleep(0.05)
        return False
