"""QEMU microvm driver against real QEMU under TCG, booting Debian's cloud kernel with a busybox initramfs."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from banger.drivers import process
from banger.drivers.base import AgentChannel, AgentTransport, Disk, StopOutcome, VmmHandle, VmSpec
from banger.drivers.host import DEV_VHOST_VSOCK
from banger.drivers.qemu import QemuDriver
from banger.errors import ToolError, UnsupportedError

from .conftest import GuestKernel, console_text

pytestmark = [pytest.mark.vm, pytest.mark.anyio]

BOOT_TIMEOUT = 240.0


def make_spec(
    tmp_path: Path, kernel: GuestKernel, mode: str, *, agent: bool = False, disks: tuple[Disk, ...] = ()
) -> VmSpec:
    channel = AgentChannel(AgentTransport.VIRTIO_SERIAL, socket=tmp_path / "agent.sock") if agent else None
    return VmSpec(
        name=f"test-{mode}",
        vcpus=1,
        memory_mib=256,
        kernel=kernel.vmlinuz,
        initrd=kernel.initramfs,
        cmdline=f"console=ttyS0 panic=-1 rdinit=/init banger_test={mode}",
        console_log=tmp_path / "console.log",
        run_dir=tmp_path / "run",
        agent=channel,
        disks=disks,
    )


async def wait_console(path: Path, marker: str, handle: VmmHandle, timeout: float = BOOT_TIMEOUT) -> None:
    """Wait for `marker` in the console log (this is a test: polling a file is fine here)."""
    deadline = time.monotonic() + timeout
    while marker not in console_text(path):
        if not process.matches(handle):
            pytest.fail(f"VMM died before {marker!r}; console:\n{console_text(path)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {marker!r} after {timeout}s; console:\n{console_text(path)[-3000:]}")
        await asyncio.sleep(0.2)


async def test_boot_agent_channel_and_graceful_powerdown(
    tmp_path: Path, test_kernel: GuestKernel, qemu_driver: QemuDriver, vmm_reaper: list[VmmHandle]
) -> None:
    root, seed = tmp_path / "root.img", tmp_path / "seed.img"
    root.write_bytes(b"\0" * (4 << 20))
    seed.write_bytes(b"\0" * (1 << 20))
    disks = (Disk(root), Disk(seed, read_only=True))
    spec = make_spec(tmp_path, test_kernel, "powerbutton", agent=True, disks=disks)
    handle = await qemu_driver.launch(spec)
    vmm_reaper.append(handle)
    assert qemu_driver.is_alive(handle)
    assert handle.start_time == process.start_time(handle.pid)
    status = await qemu_driver.qmp(handle, "query-status")
    assert status["status"] == "running"

    # The agent socket exists as soon as launch returns, and the guest's write on the port reaches it.
    with socket.socket(socket.AF_UNIX) as agent:
        agent.connect(str(spec.agent.socket))  # type: ignore[union-attr]
        agent.settimeout(BOOT_TIMEOUT)
        line = await asyncio.to_thread(agent.recv, 100)
    assert line.startswith(b"hello from vport"), line

    await wait_console(spec.console_log, "BANGER-WAITING-FOR-POWER-BUTTON", handle)
    text = console_text(spec.console_log)
    assert "Linux version" in text
    # Root disk first and writable, seed disk second and read-only (sizes in 512-byte sectors).
    assert "BANGER-DISK vda ro=0 sectors=8192" in text
    assert "BANGER-DISK vdb ro=1 sectors=2048" in text
    if qemu_driver.accel == "tcg":
        assert "tsc_early_khz=" in text  # TCG gets the host TSC frequency on its command line
        cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"-accel") + 1] == b"tcg,tb-size=128"  # the translation cache is capped

    outcome = await qemu_driver.stop(handle, timeout=60)
    assert outcome is StopOutcome.GRACEFUL, console_text(spec.console_log)[-2000:]
    assert "BANGER-POWERING-OFF" in console_text(spec.console_log)
    assert not qemu_driver.is_alive(handle)
    assert not handle.control_socket.exists()
    assert not spec.agent.socket.exists()  # type: ignore[union-attr]
    assert await qemu_driver.stop(handle, timeout=1) is StopOutcome.ALREADY_GONE


async def test_stop_times_out_then_kills_and_adopt(
    tmp_path: Path, test_kernel: GuestKernel, qemu_driver: QemuDriver, vmm_reaper: list[VmmHandle]
) -> None:
    spec = make_spec(tmp_path, test_kernel, "ignore")
    handle = await qemu_driver.launch(spec)
    vmm_reaper.append(handle)

    # A restarted daemon re-finds the VMM from the stored record alone.
    again = qemu_driver.adopt(VmmHandle.from_dict(handle.to_dict()))
    assert again == handle
    # ...but not a record whose pid now belongs to another process (start time differs).
    assert qemu_driver.adopt(VmmHandle.from_dict({**handle.to_dict(), "start_time": handle.start_time - 1})) is None

    await wait_console(spec.console_log, "BANGER-IGNORING-POWER-BUTTON", handle)
    began = time.monotonic()
    outcome = await qemu_driver.stop(handle, timeout=3)
    assert outcome is StopOutcome.KILLED
    assert time.monotonic() - began >= 3
    assert not qemu_driver.is_alive(handle)
    assert not handle.control_socket.exists()
    assert qemu_driver.adopt(handle) is None  # dead pid


async def test_missing_kernel_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, qemu_driver: QemuDriver, vmm_reaper: list[VmmHandle]
) -> None:
    bogus = tmp_path / "missing-kernel"
    spec = VmSpec(
        name="bad",
        vcpus=1,
        memory_mib=128,
        kernel=bogus,
        cmdline="console=ttyS0",
        console_log=tmp_path / "console.log",
        run_dir=tmp_path / "run",
    )
    with pytest.raises(ToolError, match="missing-kernel") as info:
        await qemu_driver.launch(spec)
    # Unconfined, QEMU itself fails to load it; confined (drivers/confine.py), the daemon fails to open it first.
    assert "QMP query-status failed" in str(info.value) or "for the VMM" in str(info.value)
    assert not (tmp_path / "run" / "qmp.sock").exists()


def test_argv_wires_devices(tmp_path: Path) -> None:
    from banger.drivers.base import NetSpec

    driver = QemuDriver("/usr/bin/qemu-system-x86_64", "kvm")
    spec = VmSpec(
        name="a,b",
        vcpus=2,
        memory_mib=512,
        kernel=tmp_path / "k",
        cmdline="console=ttyS0",
        console_log=tmp_path / "c,log",
        run_dir=tmp_path,
        disks=(Disk(tmp_path / "root.img"), Disk(tmp_path / "seed.img", read_only=True)),
        net=NetSpec("tap-x", "02:00:00:00:00:01"),
        agent=AgentChannel(AgentTransport.VSOCK, guest_cid=7),
    )
    argv = driver.argv(spec, 5, None)
    joined = " ".join(argv)
    assert "-accel kvm" in joined and "-cpu host" in joined
    assert "tsc_early_khz" not in joined  # only TCG needs it
    assert f"file={tmp_path}/root.img,format=raw,if=none,readonly=off" in joined
    assert "readonly=on" in joined
    assert f"path={tmp_path}/c,,log" in joined  # commas in paths are escaped for QEMU
    assert "ifname=tap-x,script=no,downscript=no" in joined
    assert "vhost-vsock-device,guest-cid=7" in joined
    assert "socket,id=qmp,fd=5,server=on,wait=off" in joined


async def test_vsock_without_vhost_vsock_is_refused_up_front(tmp_path: Path, qemu_driver: QemuDriver) -> None:
    if DEV_VHOST_VSOCK.exists():
        pytest.skip("this host has /dev/vhost-vsock; the refusal cannot be observed")
    spec = VmSpec(
        name="vsock",
        vcpus=1,
        memory_mib=128,
        kernel=tmp_path / "k",
        cmdline="",
        console_log=tmp_path / "console.log",
        run_dir=tmp_path / "run",
        agent=AgentChannel(AgentTransport.VSOCK, guest_cid=9),
    )
    with pytest.raises(UnsupportedError, match="/dev/vhost-vsock"):
        await qemu_driver.launch(spec)
    assert not spec.run_dir.exists()  # refused before anything was created
