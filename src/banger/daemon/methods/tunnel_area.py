"""Tunnel methods: vm.tunnel (a TCP stream to a guest port), vm.forward (published ports), vm.ssh, vm.ssh_hosts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Any

from banger.daemon.app import App
from banger.errors import InvalidInputError
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    tunnels = app.tunnels

    @reg.method("vm.tunnel")
    async def tunnel(ctx: CallContext, name: str, port: int) -> dict[str, Any]:
        """Join this call to guest 127.0.0.1:PORT (NAME may be NAME.<dns_domain>).

        Events down: {connected}, then {data} (base64) as the guest sends, and {ack: n} once n bytes of the
        caller's input went into the tunnel (the caller keeps a bounded window of unacknowledged input).
        `$/input` up: {data} (base64), {eof}. Ends with {closed: true} when the guest side has finished.
        """
        t = await tunnels.open(name, port)

        async def upstream() -> None:
            while True:
                msg = await ctx.inbox.get()
                if "data" in msg:
                    data = base64.b64decode(msg["data"])
                    await t.write(data)
                    ctx.event({"ack": len(data)})
                if msg.get("eof"):
                    await t.write_eof()
                    return

        up = asyncio.create_task(upstream())
        try:
            await ctx.send_event({"connected": True})
            while data := await t.read():
                await ctx.send_event({"data": base64.b64encode(data).decode()})
            finished = up.done() and not up.cancelled() and up.exception() is None
            if finished:  # both ways half-closed: let the agent deliver our last input before the stream goes
                await t.finish()
            return {"closed": True}
        finally:
            up.cancel()
            with contextlib.suppress(BaseException):
                await up
            await t.close()

    @reg.method("vm.forward")
    async def forward(
        ctx: CallContext,
        name: str,
        specs: list[str] | None = None,
        host_port: int | None = None,
        guest_port: int | None = None,
        remove: bool = False,
    ) -> list[dict[str, Any]]:
        """Publish ports `[ADDR:]HOST:GUEST` of a VM (or stop publishing them); returns its published ports."""
        items = list(specs or [])
        if host_port is not None:
            items.append(f"{host_port}:{guest_port if guest_port is not None else host_port}")
        if not items:
            raise InvalidInputError("give at least one port, [ADDR:]HOST:GUEST")
        return await tunnels.forward(name, items, remove=remove)

    @reg.method("vm.ssh")
    async def ssh(ctx: CallContext, name: str, keys: list[str] | None = None) -> dict[str, Any]:
        """Authorize the caller's public keys in a running VM; its names and pinned SSH host keys."""
        return await tunnels.ssh(name, keys or [])

    @reg.method("vm.ssh_hosts")
    async def ssh_hosts(ctx: CallContext) -> dict[str, Any]:
        """Pinned SSH host keys of every VM, the DNS domain and the guest user, for `banger ssh-config`."""
        return tunnels.ssh_hosts()
