"""VMs made from a snapshot: their record and disks, and their first start, which resumes the saved machine.

A clone's root disk is a qcow2 overlay on the snapshot's frozen disk, so it costs only what it writes. Its
first start loads the snapshot's device state into a new QEMU whose RAM maps the snapshot's RAM image
copy-on-write; with the guest still paused its link is taken down, then the guest runs, the agent is reached
and given the clone's own identity (see guest/reidentify.py), and only then does the link come up: the clone
never shows itself on the bridge with the original's MAC or address. Later starts are ordinary cold boots.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import secrets
import shutil
import sqlite3
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from banger import proc
from banger.aio import in_thread
from banger.drivers.base import NetSpec, RestoreFrom, VmmHandle, VmmKind
from banger.drivers.qemu import QemuDriver
from banger.errors import AlreadyExistsError, BangerError, InvalidInputError, UnsupportedError
from banger.guest.client import AgentClient, AgentError
from banger.guest.protocol import Kind
from banger.names import generate_name, validate_name
from banger.net.guestnet import GuestNet
from banger.progress import Progress, ProgressEvent, no_progress
from banger.vms import records
from banger.vms.agents import AgentEndpoint
from banger.vms.model import NetMode, VmRecord, VmState, parse_publish
from banger.vms.service import AGENT_SOCKET, SEED_DISK, VmService

log = logging.getLogger("banger.vms")

ROOT_OVERLAY = "root.qcow2"
# The guest reports a few hundred bytes; anything beyond this is cut off on the host side.
REPORT_LIMIT = 64 * 1024
REIDENTIFY_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class SnapshotSource:
    """What a VM made from a snapshot needs from it (the snapshot service fills this in)."""

    id: str
    name: str
    vmm_version: str
    machine: dict[str, Any]
    root_disk: Path
    seed_disk: Path
    state: Path
    memory: Path


def _overlay(backing: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        proc.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(tmp)],
            step="create the clone's disk overlay",
            timeout=60,
        )
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_sparse(src: Path, dest: Path) -> None:
    proc.run(["cp", "--sparse=always", str(src), str(dest)], step="copy the seed drive", timeout=120)


def check_vmm_version(vms: VmService, snap: SnapshotSource) -> None:
    """Refuse a restore under a QEMU other than the one that saved the snapshot."""
    current = vms.caps().qemu.version
    if current != snap.vmm_version:
        raise UnsupportedError(
            f"snapshot {snap.name} was saved by QEMU {snap.vmm_version}; this host runs QEMU {current}, "
            "which cannot be trusted to load its machine state",
            hint="boot a VM cold instead (vm create), or restore on a host with the same QEMU",
        )


async def create_from_snapshot(
    vms: VmService,
    snap: SnapshotSource,
    *,
    name: str | None,
    net: str | None,
    publish: list[str] | None,
    progress: Progress = no_progress,
) -> VmRecord:
    """Record a VM whose first start resumes `snap`; its root disk is an overlay on the snapshot's."""
    check_vmm_version(vms, snap)
    machine = snap.machine
    net_mode = NetMode(machine.get("net", NetMode.NONE))
    if net is not None and NetMode(net) is not net_mode:
        has = "a network device" if net_mode is NetMode.BRIDGE else "no network device"
        raise InvalidInputError(
            f"snapshot {snap.name} is of a machine with {has} (--net {net_mode.value}); a restore cannot change it"
        )
    forwards = [parse_publish(p) for p in publish or []]
    if forwards and net_mode is NetMode.NONE:
        raise InvalidInputError("--publish needs a network (the snapshot's machine has none)")
    if net_mode is NetMode.BRIDGE:
        await vms.network.setup()
        vms.network.require()
    vms.kernels.get(str(machine["kernel"]))  # a clear NotFoundError if the kernel went away
    taken = {vm.name for vm in vms.all()}
    name = name or generate_name(taken)
    validate_name(name, "VM name")
    if name in taken:
        raise AlreadyExistsError(f"a VM named {name!r} already exists")
    vm = VmRecord(
        id=secrets.token_hex(6),
        name=name,
        state=VmState.CREATED,
        vmm=VmmKind.QEMU.value,
        kernel=str(machine["kernel"]),
        image=str(machine["image"]),
        vcpus=int(machine["vcpus"]),
        memory_mib=int(machine["memory_mib"]),
        disk_bytes=int(machine["disk_bytes"]),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        spec={
            "net": net_mode.value,
            "snapshot": snap.id,
            "root_format": "qcow2",
            "restore": {"state": str(snap.state), "memory": str(snap.memory), "vmm_version": snap.vmm_version},
        },
    )
    vdir = vms.vm_dir(vm.id)
    vdir.mkdir(parents=True)
    try:
        progress(ProgressEvent(step=f"overlay the disk of snapshot {snap.name}"))
        await in_thread(_overlay, snap.root_disk, vdir / ROOT_OVERLAY)
        await in_thread(_copy_sparse, snap.seed_disk, vdir / SEED_DISK)
        records.insert(vms.store, vm)
        if net_mode is NetMode.BRIDGE:
            vm.spec["ip"] = str(vms.network.allocate(vm.id, vm.name))
            vms.store.execute("UPDATE vms SET spec=? WHERE id=?", (json.dumps(vm.spec), vm.id))
            if forwards:
                await in_thread(vms.network.set_forwards, vm.id, forwards)
    except sqlite3.IntegrityError as exc:
        shutil.rmtree(vdir, ignore_errors=True)
        raise AlreadyExistsError(f"a VM named {name!r} already exists") from exc
    except BaseException:
        if net_mode is NetMode.BRIDGE:
            await vms.network.release(vm.id)
        vms.store.execute("DELETE FROM vms WHERE id=?", (vm.id,))
        shutil.rmtree(vdir, ignore_errors=True)
        raise
    log.info("vm %s created from snapshot %s", vm.name, snap.name)
    return vm


def identity(vm: VmRecord, gnet: GuestNet | None) -> dict[str, Any]:
    """What makes this clone a machine of its own, as guest/reidentify.py takes it."""
    data: dict[str, Any] = {
        "hostname": vm.name,
        "machine_id": secrets.token_hex(16),
        "entropy": base64.b64encode(secrets.token_bytes(64)).decode(),
        "time": time.time(),
    }
    if gnet is not None:
        data["network"] = {
            "name": "eth0",
            "mac": gnet.guest_mac,
            "address": str(gnet.ip),
            "prefix": gnet.prefix,
            "gateway": str(gnet.gateway),
            "nameservers": [str(n) for n in gnet.nameservers],
            "search": list(gnet.search),
        }
    return data


async def reidentify(client: AgentClient, data: dict[str, Any]) -> dict[str, Any]:
    """Run guest/reidentify.py in the guest with `data`; its report, or a clear error.

    In the agent's own process when it serves REIDENTIFY; with `python3 -c` otherwise (an agent saved in an older
    snapshot), which starts an interpreter: most of a second more under TCG."""
    source = resources.files("banger.guest").joinpath("reidentify.py").read_text()
    data = {**data, "time": time.time()}  # as late as possible: the guest steps its clock to it
    if client.supports(Kind.REIDENTIFY):
        try:
            reply = await client.call(Kind.REIDENTIFY, REIDENTIFY_TIMEOUT, source=source, identity=data)
        except AgentError as exc:
            raise BangerError(f"the guest could not take its new identity: {exc}") from exc
        got = reply.get("report")
        if not isinstance(got, dict):
            raise BangerError("the guest's identity report is not a JSON object")
        return got
    out, err = bytearray(), bytearray()

    def bounded(buf: bytearray) -> Any:
        return lambda chunk: buf.extend(chunk[: max(0, REPORT_LIMIT - len(buf))])

    status = await asyncio.wait_for(
        client.exec(
            ["python3", "-I", "-c", source],
            stdin=json.dumps(data).encode(),
            stdout=bounded(out),
            stderr=bounded(err),
        ),
        REIDENTIFY_TIMEOUT,
    )
    if not status.ok:
        detail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise BangerError(f"the guest could not take its new identity: {' | '.join(detail) or status}")
    try:
        report: dict[str, Any] = json.loads(out.decode(errors="replace"))
    except ValueError as exc:
        raise BangerError("the guest's identity report is not JSON") from exc
    return report


async def restore_boot(vms: VmService, vm: VmRecord, progress: Progress, timeout: float) -> VmRecord:
    """The first start of a VM made from a snapshot: resume the saved machine under the VM's own identity."""
    saved = vm.spec["restore"]
    current = vms.caps().qemu.version
    if saved.get("vmm_version") != current:
        raise UnsupportedError(
            f"VM {vm.name} resumes a snapshot saved by QEMU {saved.get('vmm_version')}; this host runs QEMU "
            f"{current}, which cannot be trusted to load its machine state"
        )
    vms._set_state(vm, VmState.STARTING)
    driver = vms.driver(VmmKind.QEMU)
    handle: VmmHandle | None = None
    gnet: GuestNet | None = None
    host_keys = asyncio.ensure_future(vms.host_keys.take(f"root@{vm.name}"))  # ready, or made while QEMU loads
    host_keys.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure is handled where awaited
    try:
        spec = dataclasses.replace(
            vms._spec(vm), restore=RestoreFrom(state=Path(saved["state"]), memory=Path(saved["memory"]))
        )
        if vm.spec.get("net") == NetMode.BRIDGE:
            gnet = await vms.network.plug(vm.id)
            spec = dataclasses.replace(spec, net=NetSpec(gnet.tap, gnet.guest_mac))
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        runtime: dict[str, Any] = {"agent_socket": str(spec.run_dir / AGENT_SOCKET)}

        def record(spawned: VmmHandle) -> None:
            vms._set_runtime(vm, {**runtime, "handle": spawned.to_dict()})

        progress(ProgressEvent(step="load the saved machine"))
        handle = await driver.launch(spec, on_spawn=record)
        record(handle)
        vms._watch(vm.id, driver, handle)
        if not isinstance(driver, QemuDriver):
            raise UnsupportedError("only QEMU VMs resume snapshots")
        qmp = driver.qmp
        if gnet is not None:
            await qmp(handle, "set_link", {"name": "net0", "up": False})
        await qmp(handle, "cont")
        progress(ProgressEvent(step="give the guest its own identity"))
        resumed = time.monotonic()
        client = await vms.agents.get(vm.id, AgentEndpoint.from_runtime(runtime), timeout)
        connected = time.monotonic()
        data = identity(vm, gnet)
        try:
            if keys := await host_keys:
                data["ssh_host_keys"] = keys
        except Exception as exc:  # any failure here only means the guest makes its own keys
            log.warning("vm %s: host-side SSH host keys failed (%s); the guest makes its own", vm.name, exc)
        keyed = time.monotonic()
        report = await reidentify(client, data)
        log.info(
            "vm %s resumed: agent back after %.2fs, host keys waited for %.2fs, new identity took %.2fs",
            vm.name, connected - resumed, keyed - connected, time.monotonic() - keyed,
        )  # fmt: skip
        if report.get("problems"):
            raise BangerError(f"the guest could not take its new network settings: {report['problems']}")
        if gnet is not None:
            await qmp(handle, "set_link", {"name": "net0", "up": True})
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, BangerError) else f"{type(exc).__name__}: {exc}"
        host_keys.cancel()
        try:
            if handle is not None:
                vms._unwatch(vm.id)
                await driver.kill(handle)
            await vms.agents.drop(vm.id)
            if gnet is not None:
                await vms.network.unplug(vm.id)
        finally:
            vms._set_runtime(vm, None)
            vms._set_state(vm, VmState.ERROR, reason)
        if isinstance(exc, BangerError):
            raise BangerError(f"VM {vm.name} failed to resume its snapshot: {reason}") from exc
        raise
    vms.host_keys.refill()  # for the next clone, now that this one is up
    # Resumed once: from now on this VM boots cold, from its own disk.
    vm.spec.pop("restore", None)
    if report.get("ssh_host_keys"):
        vm.spec["ssh_host_keys"] = report["ssh_host_keys"]
    vms.store.execute("UPDATE vms SET spec=? WHERE id=?", (json.dumps(vm.spec), vm.id))
    vms._set_state(vm, VmState.RUNNING)
    return vms.get(vm.id)


def snapshot_of(vm: VmRecord) -> str | None:
    """The id of the snapshot a VM was made from (its disk depends on that snapshot's), if any."""
    value = vm.spec.get("snapshot")
    return str(value) if value else None


def require_qemu(vm: VmRecord) -> None:
    if vm.vmm != VmmKind.QEMU:
        raise UnsupportedError(
            f"VM {vm.name} runs under {vm.vmm}: banger snapshots and clones QEMU VMs only for now",
            hint="Firecracker's snapshot API is driven at the driver level only (drivers/firecracker_snapshot.py)",
        )
