"""Firecracker snapshots through its API: pause, full snapshot (device state + guest memory file), load.

A snapshot is two files: Firecracker's microVM state and the guest memory. A restore is a fresh Firecracker
process that gets `PUT /snapshot/load` instead of a configuration: the memory file is mapped privately
(backend `File`), so clones of one snapshot share its pages copy-on-write, as under QEMU. The network
device's host TAP is replaced on load (`network_overrides`); the vsock device's Unix socket keeps the path it had
when saved, so each clone must run where that path is its own: the jailer's chroot gives that (see `load`).

Only the API is exercised on this host (its /dev/kvm is kvm_pvm, where a guest kernel never runs); with
hardware KVM the same calls restore a running guest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.drivers import confine, fcjail, process
from banger.drivers.base import VmmHandle
from banger.drivers.firecracker import API_SOCKET, VMM_LOG, FirecrackerDriver, _api, _instance_id
from banger.errors import InvalidInputError

STATE_FILE = "vmstate"
MEMORY_FILE = "memory"


@dataclass(frozen=True)
class FirecrackerSnapshot:
    """The files of one Firecracker snapshot."""

    state: Path
    memory: Path

    @classmethod
    def in_dir(cls, directory: Path) -> FirecrackerSnapshot:
        return cls(directory / STATE_FILE, directory / MEMORY_FILE)


async def pause(handle: VmmHandle) -> None:
    """Pause the guest's vCPUs (PATCH /vm)."""
    async with _api(handle.control_socket) as api:
        await api.vm.patch({"state": "Paused"})


async def resume(handle: VmmHandle) -> None:
    """Let the guest's vCPUs run again (PATCH /vm)."""
    async with _api(handle.control_socket) as api:
        await api.vm.patch({"state": "Resumed"})


async def create(handle: VmmHandle, dest: FirecrackerSnapshot, *, resume_after: bool = True) -> None:
    """Pause, write a full snapshot to `dest`, and (unless told otherwise) resume. A jailed Firecracker writes
    into its chroot; the files are then moved to `dest` (the state root is one filesystem) and made root's."""
    dest.state.parent.mkdir(parents=True, exist_ok=True)
    root = fcjail.root_of(handle)
    state, memory = (dest.state, dest.memory) if root is None else (root / "vmstate.new", root / "memory.new")
    await pause(handle)
    try:
        async with _api(handle.control_socket) as api:
            await api.snapshot_create.put(
                {
                    "snapshot_type": "Full",
                    "snapshot_path": os.fspath(state) if root is None else "/" + state.name,
                    "mem_file_path": os.fspath(memory) if root is None else "/" + memory.name,
                }
            )
        if root is not None:
            for inner, final in ((state, dest.state), (memory, dest.memory)):
                os.replace(inner, final)
                os.chown(final, 0, 0)
                os.chmod(final, 0o600)
    finally:
        if resume_after:
            await resume(handle)


async def load(
    driver: FirecrackerDriver,
    snap: FirecrackerSnapshot,
    run_dir: Path,
    name: str,
    *,
    tap: str | None = None,
    resume_vm: bool = True,
    disks: Sequence[Path] = (),
    vcpus: int | None = None,
) -> VmmHandle:
    """A new Firecracker process resuming `snap` (its memory mapped copy-on-write); `tap` replaces eth0's TAP.

    Jailed (fcjail.py), the clone runs in a chroot of its own: the snapshot files are brought in (linked, or
    copied when only root may read them), `disks` (the clone's own, in the order the VM had them) become
    /disk0, /disk1, … as in the original's chroot, and its vsock socket is its own by construction."""
    for path in (snap.state, snap.memory):
        if not path.is_file():
            raise InvalidInputError(f"snapshot file {path} is missing")
    jailer = fcjail.wanted(driver.binary)
    with confine.spawn_lock():
        if jailer is None:
            api_socket = run_dir / API_SOCKET
            process.check_socket_paths(api_socket)
            run_dir.mkdir(parents=True, exist_ok=True)
            api_socket.unlink(missing_ok=True)
            argv = [driver.binary, "--api-sock", os.fspath(api_socket), "--id", _instance_id(name)]
            state, memory = os.fspath(snap.state), os.fspath(snap.memory)
            jail = None
        else:
            jail = fcjail.Jail(run_dir, _instance_id(run_dir.name), confine.free_uid())
            api_socket = jail.api_socket
            process.check_socket_paths(api_socket, jail.root / f"{fcjail.JAIL_AGENT_SOCKET}_65535")
            run_dir.mkdir(parents=True, exist_ok=True)
            jail.prepare()
            try:
                state = jail.bring_in(snap.state, STATE_FILE, private=False)
                memory = jail.bring_in(snap.memory, MEMORY_FILE, private=False)
                for i, disk in enumerate(disks):
                    jail.bring_in(disk, f"disk{i}", private=True)
                if tap is not None:
                    fcjail.give_tap(tap, jail.uid)
            except BaseException:
                jail.remove()
                raise
            memory_mib = max(64, snap.memory.stat().st_size >> 20)
            argv = jail.command(jailer, driver.binary, vcpus or os.cpu_count() or 1, memory_mib)
        pid = process.spawn(argv, log_file=run_dir / VMM_LOG, stdout_file=run_dir / "console.log")
        started = process.start_time(pid)
        if jail is not None:
            confine.hand_out(jail.uid, pid, started)
    handle = VmmHandle(driver.kind, pid, started or -1, api_socket, run_dir)
    try:
        await driver._wait_api(handle)
        body: dict[str, object] = {
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": memory},
            "enable_diff_snapshots": False,
            "resume_vm": resume_vm,
        }
        if tap is not None:
            body["network_overrides"] = [{"iface_id": "eth0", "host_dev_name": tap}]
        async with _api(api_socket) as api:
            await api.snapshot_load.put(body)
    except BaseException:
        await driver.kill(handle)
        raise
    return handle
