"""network.* methods (status, host DNS setup) and vm.forward (published ports)."""

from __future__ import annotations

from typing import Any

from banger.aio import in_thread
from banger.daemon.app import App
from banger.errors import NotFoundError
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

    @reg.method("vm.forward")
    async def forward(
        ctx: CallContext, name: str, host_port: int, guest_port: int | None = None, remove: bool = False
    ) -> list[dict[str, Any]]:
        """Publish host TCP port -> guest port (or stop publishing it); returns the VM's published ports."""
        vm = app.vms.get(name)
        async with app.vms.lock(vm.id):  # read-modify-write of the VM's ports: one caller at a time
            return await _update_forwards(vm.id, vm.name, host_port, guest_port, remove)

    async def _update_forwards(
        vm_id: str, vm_name: str, host_port: int, guest_port: int | None, remove: bool
    ) -> list[dict[str, Any]]:
        net = app.network
        current = {f["host_port"]: f["guest_port"] for f in net.forwards(vm_id)}
        if remove:
            if host_port not in current:
                raise NotFoundError(f"VM {vm_name} does not publish host port {host_port}")
            del current[host_port]
        else:
            current[host_port] = host_port if guest_port is None else guest_port
        await in_thread(net.set_forwards, vm_id, sorted(current.items()))
        return net.forwards(vm_id)
