"""Firecracker snapshot create/load against the real binary, at the API level (see test_firecracker.py for why).

The microVM is built and started for real under this host's kvm_pvm; its vCPUs never run a guest, but pause,
snapshot, and load into a fresh process are Firecracker's own code paths and are checked end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.drivers import firecracker_snapshot as fcs
from banger.drivers import process
from banger.drivers.base import VmmHandle
from banger.drivers.firecracker import FirecrackerDriver
from banger.errors import BangerError, InvalidInputError

from .conftest import GuestKernel
from .test_firecracker import make_spec

pytestmark = [pytest.mark.firecracker, pytest.mark.anyio]


async def test_snapshot_create_then_load_in_a_new_process(
    tmp_path: Path, test_kernel: GuestKernel, firecracker_driver: FirecrackerDriver, vmm_reaper: list[VmmHandle]
) -> None:
    spec = make_spec(tmp_path, test_kernel.vmlinux, initrd=test_kernel.initramfs)
    handle = await firecracker_driver.launch(spec)
    vmm_reaper.append(handle)
    snap = fcs.FirecrackerSnapshot.in_dir(tmp_path / "snap")

    await fcs.create(handle, snap)
    assert snap.state.stat().st_size > 0
    assert snap.memory.stat().st_size == spec.memory_mib << 20  # the whole guest RAM, sparse
    assert (await firecracker_driver.describe(handle))["state"] == "Running"  # resumed after the snapshot

    # The vsock device's socket path is part of the saved state: the original must let go of it first.
    await firecracker_driver.kill(handle)
    disks = [d.path for d in spec.disks]  # jailed, the clone's chroot gets them where the original had them
    restored = await fcs.load(firecracker_driver, snap, tmp_path / "c", "fc-clone", resume_vm=False, disks=disks)
    vmm_reaper.append(restored)
    assert (await firecracker_driver.describe(restored))["state"] == "Paused"
    await fcs.resume(restored)
    assert (await firecracker_driver.describe(restored))["state"] == "Running"
    config = await firecracker_driver.vm_config(restored)
    assert config["machine-config"]["mem_size_mib"] == spec.memory_mib
    await firecracker_driver.kill(restored)
    assert not process.matches(restored)


async def test_load_refuses_missing_or_corrupt_snapshots(
    tmp_path: Path, firecracker_driver: FirecrackerDriver, vmm_reaper: list[VmmHandle]
) -> None:
    snap = fcs.FirecrackerSnapshot.in_dir(tmp_path)
    with pytest.raises(InvalidInputError, match="missing"):
        await fcs.load(firecracker_driver, snap, tmp_path / "run", "fc-bad")
    snap.state.write_bytes(b"not a snapshot")
    snap.memory.write_bytes(b"\0" * 4096)
    with pytest.raises(BangerError, match="snapshot/load"):
        await fcs.load(firecracker_driver, snap, tmp_path / "run", "fc-bad")
    assert not list((tmp_path / "run").glob("*.sock"))  # the failed process was killed and its socket removed
    assert not (tmp_path / "run" / "firecracker").exists()  # and its jail
