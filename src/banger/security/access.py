"""The daemon's access policy: who may connect, which calls are root's, whose VM a call touches, how much a VM
may take, and which parameters are host paths to be handled with the caller's rights.

It wraps every RPC call (RpcServer middleware), so the method handlers stay as they were and a new method is
covered by adding one line to a table here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banger.aio import in_thread, in_thread_cancellable
from banger.config import Settings
from banger.errors import NotFoundError, PermissionDeniedError
from banger.images.spec import parse_size
from banger.rpc.server import CallContext, Invoke
from banger.security import hostpaths
from banger.security.caller import Caller, group_id, user_name
from banger.security.hostpaths import Access, PathParam
from banger.security.owners import OwnerService
from banger.vms.service import VmService

log = logging.getLogger("banger.security")

DEFAULT_GROUP = "banger"
GIB = 1 << 30

# Host-global operations: they change the host for every user.
ROOT_ONLY = frozenset({"network.setup_host", "network.teardown", "daemon.stop"})
# Areas whose methods name one VM in `name` (or `vm`); the caller must own it.
VM_AREAS = ("vm.", "session.", "guest.")
NOT_ONE_VM = frozenset({"vm.create", "vm.list", "vm.prepare"})


def _no_paths(params: dict[str, Any]) -> list[PathParam]:
    return []


def _catalog(params: dict[str, Any]) -> list[PathParam]:
    value = params.get("catalog")
    if isinstance(value, str) and value and "://" not in value:
        return [PathParam("catalog", Access.READ)]
    return []


def _cp(params: dict[str, Any]) -> list[PathParam]:
    direction = params.get("direction")
    if direction == "in":
        return [PathParam("src", Access.READ)]
    if direction == "out":
        return [PathParam("dest", Access.WRITE)]
    return []


# Every method that takes a caller-named host path, and what it does with it.
HOST_PATHS: dict[str, Callable[[dict[str, Any]], list[PathParam]]] = {
    "vm.cp": _cp,
    "image.import": lambda p: [PathParam("source", Access.READ)],
    "kernel.import": lambda p: [PathParam("path", Access.READ)],
    "kernel.bundle": lambda p: [PathParam("output", Access.WRITE)],
    "kernel.catalog": _catalog,
    "kernel.pull": _catalog,
    "vm.prepare": _catalog,
}


def socket_gid(settings: Settings) -> int | None:
    """The group allowed on the socket: `socket_group`, else `banger` when it exists; None means root only."""
    name = settings.get("socket_group")
    if name is None:
        return group_id(DEFAULT_GROUP)
    if not name:
        return None
    gid = group_id(str(name))
    if gid is None:
        from banger.errors import ConfigError

        raise ConfigError(f"socket_group {name!r}: no such group", hint=f"create it with `groupadd {name}`")
    return gid


class AccessPolicy:
    """admit() at the handshake, then __call__ around every call (see RpcServer)."""

    def __init__(self, settings: Settings, vms: VmService, owners: OwnerService) -> None:
        self.settings = settings
        self.vms = vms
        self.owners = owners
        self.gid = socket_gid(settings)
        self.staging_root = settings.paths.cache / "staging"

    def admit(self, caller: Caller) -> None:
        """Root and members of the socket group may use the daemon."""
        if caller.is_root or caller.uid == os.geteuid() or (self.gid is not None and caller.in_group(self.gid)):
            return
        raise PermissionDeniedError(
            f"permission denied: user {caller.username} may not use the banger daemon", hint=self.join_hint()
        )

    def join_hint(self) -> str:
        """How an administrator lets someone in."""
        if self.gid is None:
            return "only root may use it; set socket_group in config.toml to let a group in"
        from grp import getgrgid

        name = getgrgid(self.gid).gr_name
        return f"ask an administrator to run `usermod -aG {name} USER`, then log in again"

    async def __call__(self, ctx: CallContext, method: str, params: dict[str, Any], invoke: Invoke) -> Any:
        caller = ctx.caller
        if method in ROOT_ONLY and not caller.is_root:
            raise PermissionDeniedError(f"permission denied: {method} changes the whole host and is for root only")
        if method.startswith(VM_AREAS) and method not in NOT_ONE_VM:
            self.check_owner(caller, params)
        if method == "vm.create":
            self.check_limits(caller, params)
        paths = HOST_PATHS.get(method, _no_paths)(params)
        if paths and not caller.is_root:
            result = await self._with_paths(ctx, params, paths, invoke)
        else:
            result = await invoke(params)
        return self.shape(caller, method, result)

    def check_owner(self, caller: Caller, params: dict[str, Any]) -> None:
        """The VM a call names must be the caller's (root may touch all)."""
        if caller.is_root:
            return
        name = params.get("name", params.get("vm"))
        if not isinstance(name, str):
            return
        try:
            vm = self.vms.get(name)
        except NotFoundError:
            return  # the handler says "not found" in its own words
        if self.owners.owner(vm.id) != caller.uid:
            raise PermissionDeniedError(f"permission denied: VM {vm.name} belongs to another user")

    def check_limits(self, caller: Caller, params: dict[str, Any]) -> None:
        """Upper bounds from config on what one VM, and one user, may take."""
        s = self.settings
        vcpus, memory = params.get("vcpus", 2), params.get("memory_mib", 1024)
        if isinstance(vcpus, int) and vcpus > int(s.get("max_vcpus")):
            raise PermissionDeniedError(f"{vcpus} vCPUs is over this host's limit (max_vcpus = {s.get('max_vcpus')})")
        if isinstance(memory, int) and memory > int(s.get("max_memory_mib")):
            raise PermissionDeniedError(
                f"{memory} MiB is over this host's limit (max_memory_mib = {s.get('max_memory_mib')})"
            )
        disk = params.get("disk_size")
        if isinstance(disk, str) and parse_size(disk) > int(s.get("max_disk_gib")) * GIB:
            raise PermissionDeniedError(
                f"disk {disk} is over this host's limit (max_disk_gib = {s.get('max_disk_gib')})"
            )
        if not caller.is_root:
            owned = len(self.owners.owned_by(caller.uid) & {vm.id for vm in self.vms.all()})
            if owned >= int(s.get("max_vms_per_user")):
                raise PermissionDeniedError(
                    f"you have {owned} VMs, the limit (max_vms_per_user = {s.get('max_vms_per_user')})",
                    hint="remove one with `banger vm rm NAME`",
                )

    async def _with_paths(
        self, ctx: CallContext, params: dict[str, Any], paths: list[PathParam], invoke: Invoke
    ) -> Any:
        """Stage what the caller reads, run the call on the copies, write what it produced back as the caller."""
        caller = ctx.caller
        with contextlib.ExitStack() as stack:
            staged = dict(params)
            writes: list[tuple[str, Path]] = []
            for p in paths:
                real = params.get(p.param)
                if not isinstance(real, str):
                    continue
                where = stack.enter_context(hostpaths.staging_dir(self.staging_root))
                if p.access is Access.READ:
                    copy = await in_thread_cancellable(functools.partial(hostpaths.stage_read, caller, real, where))
                    staged[p.param] = str(copy)
                else:
                    # Fail before the work when the caller cannot write there at all.
                    await in_thread(hostpaths.check_writable, caller, real)
                    out = where / (posixpath.basename(real.rstrip("/")) or "out")
                    staged[p.param] = str(where) if p.param == "dest" else str(out)
                    writes.append((real, where))
            result = await invoke(staged)
            for real, where in writes:
                entries = list(where.iterdir())
                if len(entries) != 1:
                    continue
                landed = await in_thread_cancellable(functools.partial(hostpaths.write_out, caller, entries[0], real))
                result = _replace_path(result, str(entries[0]), landed)
            return result

    def shape(self, caller: Caller, method: str, result: Any) -> Any:
        """VM records gain their owner; a member's listing holds only their own VMs."""
        if not method.startswith("vm."):
            return result
        owners = self.owners.all()

        def own(vm: dict[str, Any]) -> dict[str, Any]:
            uid = owners.get(str(vm["id"]), 0)
            return {**vm, "owner": user_name(uid), "owner_uid": uid}

        if isinstance(result, list) and all(_is_vm(v) for v in result):
            mine = [own(v) for v in result]
            return mine if caller.is_root else [v for v in mine if v["owner_uid"] == caller.uid]
        if _is_vm(result):
            return own(result)
        return result


def _is_vm(value: Any) -> bool:
    return isinstance(value, dict) and "id" in value and "vmm" in value and "state" in value


def _replace_path(value: Any, staged: str, real: str) -> Any:
    """The result as the caller should read it: staged paths (and file: URIs) replaced by the real ones."""
    if isinstance(value, str):
        return value.replace(Path(staged).as_uri(), Path(real).as_uri()).replace(staged, real)
    if isinstance(value, list):
        return [_replace_path(v, staged, real) for v in value]
    if isinstance(value, dict):
        return {k: _replace_path(v, staged, real) for k, v in value.items()}
    return value
