"""snapshot.* methods, and vm.snapshot / vm.clone: save a running VM's machine, and resume VMs from it."""

from __future__ import annotations

from typing import Any

from banger.daemon.app import App
from banger.errors import PermissionDeniedError
from banger.net.policy import NetPolicy
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext
from banger.vms.model import VmRecord


def register(reg: MethodRegistry, app: App) -> None:
    snaps = app.snapshots

    def describe_vm(vm: VmRecord) -> dict[str, Any]:
        data = vm.to_json()
        data["publish"] = app.tunnels.published(vm.id)
        data["snapshot"] = vm.spec.get("snapshot")
        return data

    def made_by(ctx: CallContext, vm: VmRecord) -> VmRecord:
        """A VM resumed from a snapshot belongs to the caller and starts with the default network policy."""
        app.owners.assign(vm.id, ctx.caller.uid)
        app.netpolicies.assign(vm.id, NetPolicy.parse(None))
        return vm

    def check_snapshot(ctx: CallContext, name: str) -> None:
        """A snapshot holds its VM's memory: only root and the owner of the VM it was taken from may use it."""
        if ctx.caller.is_root:
            return
        snap = snaps.get(name)
        if snap.vm_id is None or app.owners.owner(snap.vm_id) != ctx.caller.uid:
            raise PermissionDeniedError(f"permission denied: snapshot {snap.name} was taken of another user's VM")

    @reg.method("vm.snapshot")
    async def snapshot(ctx: CallContext, name: str, snapshot_name: str | None = None, stop: bool = False) -> Any:
        """Snapshot a running QEMU VM (memory, devices, disks); it runs on unless stop=true."""
        snap = await snaps.create(name, name=snapshot_name, stop=stop, progress=ctx.progress)
        return snap.to_json(snaps.used_by(snap))

    @reg.method("vm.clone")
    async def clone(
        ctx: CallContext, name: str, new_name: str | None = None, count: int = 1, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Snapshot a running VM and resume `count` clones of it, each with its own identity."""
        vms = await snaps.clone(name, name=new_name, count=count, timeout=timeout, progress=ctx.progress)
        return [describe_vm(made_by(ctx, vm)) for vm in vms]

    @reg.method("snapshot.restore")
    async def restore(
        ctx: CallContext,
        snapshot: str,
        name: str | None = None,
        start: bool = True,
        net: str | None = None,
        publish: list[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A new VM from a snapshot (`vm create --from-snapshot`), resumed unless start=false."""
        check_snapshot(ctx, snapshot)
        vm = await snaps.restore(
            snapshot, name=name, net=net, publish=publish, start=start, timeout=timeout, progress=ctx.progress
        )
        return describe_vm(made_by(ctx, vm))

    @reg.method("snapshot.list")
    async def list_(ctx: CallContext) -> list[dict[str, Any]]:
        """All snapshots (a member sees those of their own VMs)."""
        mine = [
            s for s in snaps.all() if ctx.caller.is_root or (s.vm_id and app.owners.owner(s.vm_id) == ctx.caller.uid)
        ]
        return [s.to_json(snaps.used_by(s)) for s in mine]

    @reg.method("snapshot.show")
    async def show(ctx: CallContext, name: str) -> dict[str, Any]:
        """One snapshot, with the VMs made from it."""
        check_snapshot(ctx, name)
        snap = snaps.get(name)
        return snap.to_json(snaps.used_by(snap))

    @reg.method("snapshot.rm")
    async def rm(ctx: CallContext, name: str) -> dict[str, Any]:
        """Remove a snapshot (refused while a VM made from it exists)."""
        check_snapshot(ctx, name)
        await snaps.remove(name)
        return {"removed": name}
