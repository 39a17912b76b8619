"""Firecracker driver against the real Firecracker binary, at the API level.

Why not a booted guest: this machine's /dev/kvm is kvm_pvm (paravirtual nested KVM). Firecracker starts,
serves its API, builds and starts the microVM there, but an ordinary guest kernel cannot execute under PVM,
so nothing ever appears on the console and the guest cannot act on Ctrl-Alt-Del. Everything up to and
including InstanceStart, and the whole process/socket lifecycle, is real and checked here.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from banger.drivers import firecracker as fc
from banger.drivers import process
from banger.drivers.base import AgentChannel, AgentTransport, Disk, StopOutcome, VmmHandle, VmSpec
from banger.drivers.firecracker import FirecrackerDriver
from banger.drivers.host import HostCaps
from banger.errors import BangerError, InvalidInputError, ToolError

from .conftest import GuestKernel

pytestmark = [pytest.mark.firecracker, pytest.mark.anyio]


def make_spec(tmp_path: Path, kernel: Path, *, vcpus: int = 1, initrd: Path | None = None) -> VmSpec:
    root = tmp_path / "root.img"
    seed = tmp_path / "seed.img"
    for disk in (root, seed):
        disk.write_bytes(b"\0" * (1 << 20))
    run = tmp_path / "run"
    return VmSpec(
        name="fc-test vm",
        vcpus=vcpus,
        memory_mib=128,
        kernel=kernel,
        initrd=initrd,
        cmdline="console=ttyS0 reboot=k panic=1",
        console_log=tmp_path / "console.log",
        run_dir=run,
        disks=(Disk(root), Disk(seed, read_only=True)),
        agent=AgentChannel(AgentTransport.VSOCK, socket=run / "vsock.sock", guest_cid=3),
    )


def assert_nothing_left(spec: VmSpec) -> None:
    leftovers = sorted(p.name for p in spec.run_dir.iterdir() if p.is_socket())
    assert leftovers == [], f"sockets left behind: {leftovers}"


async def test_full_configuration_starts_and_stop_kills_after_timeout(
    tmp_path: Path,
    test_kernel: GuestKernel,
    firecracker_driver: FirecrackerDriver,
    host_caps: HostCaps,
    vmm_reaper: list[VmmHandle],
) -> None:
    spec = make_spec(tmp_path, test_kernel.vmlinux, vcpus=2, initrd=test_kernel.initramfs)
    handle = await firecracker_driver.launch(spec)
    vmm_reaper.append(handle)

    info = await firecracker_driver.describe(handle)
    assert info["state"] == "Running"
    assert info["id"] == "fc-test-vm"  # sanitised for --id
    assert firecracker_driver.is_alive(handle)
    assert spec.agent is not None and spec.agent.socket is not None
    assert stat.S_ISSOCK(spec.agent.socket.stat().st_mode)  # vsock device built, its uds bound

    api_log = (spec.run_dir / fc.API_LOG).read_text()
    # The logger logs from its own configuration on, so /logger itself is not in there.
    for call in ("/metrics", "/machine-config", "/boot-source", "/drives/rootfs", "/drives/disk1", "/vsock"):
        assert f'request on "{call}"' in api_log, call
    assert "InstanceStart" in api_log
    # Firecracker flushes metrics as JSON lines once the instance runs.
    first = (spec.run_dir / fc.METRICS).read_text().splitlines()[0]
    assert "api_server" in json.loads(first)

    assert firecracker_driver.adopt(VmmHandle.from_dict(handle.to_dict())) == handle

    outcome = await firecracker_driver.stop(handle, timeout=2)
    if host_caps.kvm_usable:
        assert outcome in (StopOutcome.GRACEFUL, StopOutcome.KILLED)
    else:
        assert outcome is StopOutcome.KILLED  # the guest never ran, so nothing acted on Ctrl-Alt-Del
    assert "SendCtrlAltDel" in (spec.run_dir / fc.API_LOG).read_text()
    assert not firecracker_driver.is_alive(handle)
    assert firecracker_driver.adopt(handle) is None
    assert_nothing_left(spec)


async def test_kill_cleans_up(
    tmp_path: Path, test_kernel: GuestKernel, firecracker_driver: FirecrackerDriver, vmm_reaper: list[VmmHandle]
) -> None:
    spec = make_spec(tmp_path, test_kernel.vmlinux)
    handle = await firecracker_driver.launch(spec)
    vmm_reaper.append(handle)
    await firecracker_driver.kill(handle)
    assert process.start_time(handle.pid) is None
    assert not handle.control_socket.exists()
    assert_nothing_left(spec)
    assert await firecracker_driver.stop(handle, timeout=1) is StopOutcome.ALREADY_GONE


@pytest.mark.parametrize(
    ("change", "call"),
    [
        ({"kernel": Path("/nonexistent/vmlinux")}, "PUT /boot-source"),
        ({"vcpus": 64}, "PUT /machine-config"),
        # Not an ELF file: accepted as a path, refused when the loader reads it at start.
        ({"kernel": Path("/etc/os-release")}, "PUT /actions InstanceStart"),
    ],
)
async def test_rejected_configuration_is_a_clear_error(
    tmp_path: Path,
    test_kernel: GuestKernel,
    firecracker_driver: FirecrackerDriver,
    change: dict[str, Any],
    call: str,
) -> None:
    base = make_spec(tmp_path, test_kernel.vmlinux)
    spec = dataclasses.replace(base, **change)
    with pytest.raises(InvalidInputError, match=f"firecracker rejected {call}: .+") as info:
        await firecracker_driver.launch(spec)
    assert info.value.data["call"] == call
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    assert not any(str(spec.run_dir) in _cmdline(pid) for pid in pids), "firecracker left running"
    assert_nothing_left(spec)


async def test_missing_binary(tmp_path: Path, test_kernel: GuestKernel) -> None:
    driver = FirecrackerDriver(str(tmp_path / "no-firecracker"))
    with pytest.raises(ToolError, match="cannot start no-firecracker"):
        await driver.launch(make_spec(tmp_path, test_kernel.vmlinux))


async def test_agent_channel_must_be_vsock(tmp_path: Path, test_kernel: GuestKernel) -> None:
    spec = dataclasses.replace(
        make_spec(tmp_path, test_kernel.vmlinux),
        agent=AgentChannel(AgentTransport.VIRTIO_SERIAL, socket=tmp_path / "a.sock"),
    )
    with pytest.raises(BangerError, match="vsock"):
        await FirecrackerDriver("/bin/false").launch(spec)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
