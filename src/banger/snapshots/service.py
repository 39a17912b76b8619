"""The snapshot service: owns the `snapshots` table and the snapshot directories, takes snapshots, makes clones.

A snapshot of a running QEMU VM is taken in one pause: the guest stops, its disks are copied (sparse), its
device state is migrated to a file and its RAM copied from the memfd it lives in; then it runs on, or is shut
down cleanly with --stop. A snapshot's files are never written again: clones map its RAM copy-on-write and
put qcow2 overlays on its disk, so it cannot be removed while a VM made from it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from banger import proc
from banger.aio import in_thread
from banger.config import Settings
from banger.drivers import qemu_migrate
from banger.drivers.base import VmmHandle, VmmKind
from banger.drivers.qemu import QemuDriver
from banger.errors import AlreadyExistsError, BangerError, InvalidInputError, NotFoundError, UnsupportedError
from banger.names import validate_name
from banger.progress import Progress, ProgressEvent, no_progress
from banger.store.db import Store
from banger.vms import restore
from banger.vms.model import VmRecord, VmState
from banger.vms.service import SEED_DISK, VmService

log = logging.getLogger("banger.snapshots")

STATE = "state.mig"
MEMORY = "memory.ram"
ROOT = "root.img"
SEED = "seed.ext4"


@dataclass
class SnapshotRecord:
    """One row of the snapshots table."""

    id: str
    name: str
    vm_id: str | None
    vm_name: str
    vmm: str
    vmm_version: str
    created_at: str
    size_bytes: int
    path: Path
    implicit: bool = False
    machine: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self, used_by: list[str] | None = None) -> dict[str, Any]:
        """The public view (CLI --json)."""
        data = {
            "id": self.id,
            "name": self.name,
            "vm": self.vm_name,
            "vmm": self.vmm,
            "vmm_version": self.vmm_version,
            "created_at": self.created_at,
            "size_bytes": self.size_bytes,
            "implicit": self.implicit,
            "machine": self.machine,
            "pause_seconds": self.info.get("pause_seconds"),
            "path": str(self.path),
        }
        if used_by is not None:
            data["used_by"] = used_by
        return data

    def source(self) -> restore.SnapshotSource:
        return restore.SnapshotSource(
            id=self.id,
            name=self.name,
            vmm_version=self.vmm_version,
            machine=self.machine,
            root_disk=self.path / ROOT,
            seed_disk=self.path / SEED,
            state=self.path / STATE,
            memory=self.path / MEMORY,
        )


def _allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


def _copy_disk(src: Path, dest: Path, fmt: str) -> None:
    """A sparse raw copy of a disk; a clone's qcow2 overlay is flattened (-U: the paused QEMU holds its lock)."""
    if fmt == "qcow2":
        argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(src), str(dest)]
    else:
        argv = ["cp", "--sparse=always", str(src), str(dest)]
    proc.run(argv, step="copy the disk", timeout=600)


async def _thaw(driver: QemuDriver, handle: VmmHandle, base: Path, overlay: Path) -> None:
    """Fold a frozen disk's write overlay back into it (see `SnapshotService._save`) and delete the overlay."""
    await qemu_migrate.thaw_disk(driver.qmp, handle, "disk0", base)
    overlay.unlink(missing_ok=True)


class SnapshotService:
    """Owns snapshot rows and directories; restores go through the VM service."""

    def __init__(self, settings: Settings, store: Store, vms: VmService) -> None:
        self.settings = settings
        self.store = store
        self.vms = vms
        self.root = settings.paths.home / "snapshots"
        self._thawing: set[asyncio.Future[None]] = set()  # write overlays being folded back after a clone's snapshot
        vms.removed_hooks.append(self._vm_removed)

    # -- records ---------------------------------------------------------------------------------------------

    def _from_row(self, row: sqlite3.Row) -> SnapshotRecord:
        return SnapshotRecord(
            id=row["id"],
            name=row["name"],
            vm_id=row["vm_id"],
            vm_name=row["vm_name"],
            vmm=row["vmm"],
            vmm_version=row["vmm_version"],
            created_at=row["created_at"],
            size_bytes=row["size_bytes"],
            path=self.root / row["id"],
            implicit=bool(row["implicit"]),
            machine=json.loads(row["machine"]),
            info=json.loads(row["info"]),
        )

    def get(self, name: str) -> SnapshotRecord:
        """A snapshot by name (or id), or NotFoundError."""
        row = self.store.one("SELECT * FROM snapshots WHERE name=? OR id=?", (name, name))
        if row is None:
            raise NotFoundError(f"no snapshot named {name!r}", hint="see `banger snapshot ls`")
        return self._from_row(row)

    def all(self) -> list[SnapshotRecord]:
        return [self._from_row(r) for r in self.store.query("SELECT * FROM snapshots ORDER BY created_at, name")]

    def used_by(self, snap: SnapshotRecord) -> list[str]:
        """Names of the VMs whose disks depend on this snapshot."""
        return [vm.name for vm in self.vms.all() if restore.snapshot_of(vm) == snap.id]

    def _free_name(self, base: str) -> str:
        taken = {r["name"] for r in self.store.query("SELECT name FROM snapshots")}
        if base not in taken:
            return base
        return next(f"{base}-{i}" for i in range(2, len(taken) + 3) if f"{base}-{i}" not in taken)

    # -- take ------------------------------------------------------------------------------------------------

    async def create(
        self,
        vm_name: str,
        *,
        name: str | None = None,
        stop: bool = False,
        implicit: bool = False,
        progress: Progress = no_progress,
    ) -> SnapshotRecord:
        """Snapshot a running VM (memory, devices, disks) in one pause; it runs on, or shuts down with `stop`."""
        vm = self.vms.get(vm_name)
        restore.require_qemu(vm)
        name = name or self._free_name(f"{vm.name}-snap")
        validate_name(name, "snapshot name")
        if self.store.one("SELECT 1 FROM snapshots WHERE name=?", (name,)) is not None:
            raise AlreadyExistsError(f"a snapshot named {name!r} already exists")
        version = self.vms.caps().qemu.version
        if version is None:
            raise UnsupportedError(f"QEMU's version is unknown: {self.vms.caps().qemu.problem}")
        snap_id = secrets.token_hex(6)
        sdir = self.root / snap_id
        sdir.mkdir(parents=True)
        try:
            async with self.vms.lock(vm.id):
                vm = self.vms.get(vm.id)
                if vm.state is not VmState.RUNNING or not (vm.runtime or {}).get("handle"):
                    raise InvalidInputError(
                        f"VM {vm.name} is {vm.state.value}: only a running VM can be snapshotted",
                        hint=f"banger vm start {vm.name}",
                    )
                # A clone's snapshot does not wait for the source's disk to be folded back: the clone starts while
                # that runs (under this VM's lock, taken again: stop, rm and the next snapshot wait for it).
                handle = VmmHandle.from_dict(vm.runtime["handle"])  # type: ignore[index]
                pause = await self._save(vm, handle, sdir, progress, defer_thaw=implicit and not stop)
            await in_thread(share_with_vmms, sdir)
            if stop:
                progress(ProgressEvent(step=f"stop {vm.name}"))
                await self.vms.stop(vm.id)
            spec = self.vms._spec(vm)
            machine = {
                "kernel": vm.kernel,
                "image": vm.image,
                "vcpus": vm.vcpus,
                "memory_mib": vm.memory_mib,
                "disk_bytes": vm.disk_bytes,
                "net": vm.spec.get("net", "none"),
                "machine": "microvm",
                "accel": self.vms.driver(VmmKind.QEMU).accel,  # type: ignore[attr-defined]
                "cmdline": spec.cmdline,
            }
            snap = SnapshotRecord(
                id=snap_id,
                name=name,
                vm_id=vm.id,
                vm_name=vm.name,
                vmm=vm.vmm,
                vmm_version=version,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                size_bytes=await in_thread(_allocated, sdir),
                path=sdir,
                implicit=implicit,
                machine=machine,
                info={"pause_seconds": round(pause, 3)},
            )
            self.store.execute(
                "INSERT INTO snapshots (id, name, vm_id, vm_name, vmm, vmm_version, created_at, size_bytes, implicit, "
                "machine, info) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    snap.id,
                    snap.name,
                    snap.vm_id,
                    snap.vm_name,
                    snap.vmm,
                    snap.vmm_version,
                    snap.created_at,
                    snap.size_bytes,
                    int(snap.implicit),
                    json.dumps(snap.machine),
                    json.dumps(snap.info),
                ),
            )
        except BaseException:
            shutil.rmtree(sdir, ignore_errors=True)
            raise
        log.info("snapshot %s of vm %s taken (guest paused %.3fs)", name, vm.name, pause)
        return snap

    async def _save(
        self, vm: VmRecord, handle: VmmHandle, sdir: Path, progress: Progress, *, defer_thaw: bool = False
    ) -> float:
        """Pause the guest, save device state and RAM, and let it run again; returns the pause length.

        The root disk is not copied during the pause: its writes go to a qcow2 overlay from the pause on, the
        frozen file under it is copied while the guest runs, and the overlay is then folded back into it (with
        `defer_thaw`, by a task that takes the VM's lock once the caller has released it).
        """
        driver = self.vms.driver(VmmKind.QEMU)
        if not isinstance(driver, QemuDriver):
            raise UnsupportedError("only QEMU VMs can be snapshotted")
        root = self.vms._root_disk(vm)
        overlay = root.path.with_name(f"{root.path.name}.writes-{sdir.name}.qcow2")
        progress(ProgressEvent(step="pause the guest and save its devices and memory"))
        started = time.monotonic()
        await driver.qmp(handle, "stop")
        frozen = False
        try:
            await qemu_migrate.freeze_disk(driver.qmp, handle, "disk0", overlay)
            frozen = True
            await qemu_migrate.save_state(handle, sdir / STATE)
            clone = restore.snapshot_of(vm) is not None  # its RAM may be a private mapping: see copy_guest_memory
            await in_thread(
                qemu_migrate.copy_guest_memory, handle.pid, sdir / MEMORY, vm.memory_mib << 20, private_ok=clone
            )
        finally:
            # After a migration QEMU is in "postmigrate"; cont re-activates its disks and runs the guest on.
            await driver.qmp(handle, "cont")
            pause = time.monotonic() - started
            if frozen:
                progress(ProgressEvent(step="copy the frozen disks (the guest runs on)"))
                copied = False
                try:
                    await in_thread(_copy_disk, root.path, sdir / ROOT, root.format)
                    await in_thread(_copy_disk, self.vms.vm_dir(vm.id) / SEED_DISK, sdir / SEED, "raw")
                    copied = True
                finally:
                    if copied and defer_thaw:
                        self._thaw_later(vm, driver, handle, root.path, overlay)
                    else:
                        await _thaw(driver, handle, root.path, overlay)
        return pause

    def _thaw_later(self, vm: VmRecord, driver: QemuDriver, handle: VmmHandle, base: Path, overlay: Path) -> None:
        """Fold the write overlay back in a task of its own, under the VM's lock (which our caller still holds)."""

        async def thaw() -> None:
            async with self.vms.lock(vm.id):
                current = self.vms.get(vm.id)
                if (current.runtime or {}).get("handle") != handle.to_dict():
                    log.warning("vm %s stopped before its write overlay was folded back: %s", vm.name, overlay)
                    return
                try:
                    await _thaw(driver, handle, base, overlay)
                except Exception as exc:  # as if the daemon had stopped here: the VM runs on in the overlay
                    log.error("vm %s: folding the write overlay %s back failed: %s", vm.name, overlay, exc)

        task = asyncio.ensure_future(thaw())
        self._thawing.add(task)
        task.add_done_callback(self._thawing.discard)

    async def close(self) -> None:
        """At daemon stop: let pending folds of write overlays finish (each is short)."""
        if self._thawing:
            await asyncio.gather(*self._thawing, return_exceptions=True)

    # -- remove ----------------------------------------------------------------------------------------------

    async def remove(self, name: str) -> None:
        """Delete a snapshot and its files; refused while a VM made from it exists."""
        snap = self.get(name)
        if users := self.used_by(snap):
            raise InvalidInputError(
                f"snapshot {snap.name} is in use by {', '.join(sorted(users))}: their disks are overlays on it",
                hint="remove those VMs first (banger vm rm -f NAME)",
            )
        self.store.execute("DELETE FROM snapshots WHERE id=?", (snap.id,))
        await in_thread(shutil.rmtree, snap.path, ignore_errors=True)
        log.info("snapshot %s removed", snap.name)

    async def _vm_removed(self, vm: VmRecord) -> None:
        """A clone's implicit snapshot (from `vm clone`) goes with its last clone."""
        snap_id = restore.snapshot_of(vm)
        if snap_id is None:
            return
        try:
            snap = self.get(snap_id)
        except NotFoundError:
            return
        if snap.implicit and not self.used_by(snap):
            try:
                await self.remove(snap.id)
            except BangerError as exc:  # the VM is gone already; a leftover snapshot stays listed for `snapshot rm`
                log.warning("could not remove implicit snapshot %s with its last clone: %s", snap.name, exc)

    # -- restore and clone -----------------------------------------------------------------------------------

    async def restore(
        self,
        snap_name: str,
        *,
        name: str | None,
        net: str | None = None,
        publish: list[str] | None = None,
        start: bool = True,
        timeout: float | None = None,
        progress: Progress = no_progress,
    ) -> VmRecord:
        """A new VM from a snapshot, resumed at once unless `start` is false."""
        snap = self.get(snap_name)
        vm = await restore.create_from_snapshot(
            self.vms, snap.source(), name=name, net=net, publish=publish, progress=progress
        )
        if not start:
            return vm
        try:
            return await self.vms.start(vm.id, progress=progress, timeout=timeout)
        except BaseException:
            # A clone that never ran is not worth keeping (its disk is an empty overlay).
            await self.vms.remove(vm.id, force=True)
            raise

    async def clone(
        self,
        source: str,
        *,
        name: str | None,
        count: int = 1,
        timeout: float | None = None,
        progress: Progress = no_progress,
    ) -> list[VmRecord]:
        """Snapshot a running VM and resume `count` clones of it (named NAME, or NAME-1 … NAME-C)."""
        if count < 1 or count > 64:
            raise InvalidInputError(f"--count must be between 1 and 64 (got {count})")
        vm = self.vms.get(source)
        base = name or f"{vm.name}-clone"
        names = [base] if count == 1 else [f"{base}-{i}" for i in range(1, count + 1)]
        taken = {v.name for v in self.vms.all()}
        for n in names:
            validate_name(n, "VM name")
            if n in taken:
                raise AlreadyExistsError(f"a VM named {n!r} already exists")
        snap = await self.create(
            vm.id, name=self._free_name(f"{vm.name}-clone-{secrets.token_hex(2)}"), implicit=True, progress=progress
        )
        clones: list[VmRecord] = []
        try:
            for n in names:
                progress(ProgressEvent(step=f"resume clone {n}"))
                clones.append(await self.restore(snap.id, name=n, timeout=timeout, progress=progress))
        finally:
            if not clones:
                with contextlib.suppress(NotFoundError):  # the failed clone's removal may have taken it already
                    await self.remove(snap.id)
        return clones


def share_with_vmms(sdir: Path) -> None:
    """Confined VMMs (drivers/confine.py) resume clones from a snapshot by path: its directory and files become
    readable to the VMM group alone (a snapshot holds a VM's memory), and the directories above it traversable."""
    from banger.drivers.confine import VMM_GID

    os.chmod(sdir.parent, 0o711)
    for path in (sdir, *sdir.iterdir()):
        if os.geteuid() == 0:
            os.chown(path, 0, VMM_GID)
        # QEMU 7.2 opens a memory-backend-file read-write even for a private (copy-on-write) mapping, and has no
        # read-only file with writable RAM: the memory image is the group's to open read-write; the rest read-only.
        os.chmod(path, 0o750 if path.is_dir() else 0o660 if path.name == MEMORY else 0o640)
