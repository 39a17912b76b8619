"""network.* methods (status, host DNS setup, teardown); vm.forward lives in tunnel_area."""

from __future__ import annotations

from typing import Any

from banger.aio import in_thread
from banger.daemon.app import App
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    @reg.method("network.status")
    async def status(ctx: CallContext) -> dict[str, Any]:
        """Bridge, leases, published ports, nft table, DNS and ip_forward as they are now."""
        return await in_thread(app.network.status)

    @reg.method("network.setup_host")
    async def setup_host(ctx: CallContext) -> dict[str, Any]:
        """Route the host's *.<domain> lookups to banger's DNS (systemd-resolved), or explain how."""
        return await app.network.setup_host()

    @reg.method("network.teardown")
    async def teardown(ctx: CallContext, force: bool = False) -> dict[str, Any]:
        """Remove banger's bridge, TAPs and nft table and restore ip_forward (refused while VMs use them)."""
        return await app.network.teardown(force=force)
