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

from banger.drivers import cgroups, confine, fcjail, process
from banger.drivers import firecracker as fc
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
    jailed = fcjail.wanted(firecracker_driver.binary) is not None
    assert info["id"] == (spec.run_dir.name if jailed else "fc-test-vm")  # sanitised for --id
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
    if fcjail.wanted(firecracker_driver.binary) and spec.kernel == Path("/nonexistent/vmlinux"):
        # Jailed, the kernel is linked into the chroot first: its absence is found before Firecracker is asked.
        with pytest.raises(InvalidInputError, match="cannot bring /nonexistent/vmlinux into Firecracker's jail"):
            await firecracker_driver.launch(spec)
        assert not (spec.run_dir / "firecracker").exists()
        return
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


async def test_firecracker_runs_under_its_jailer(
    tmp_path: Path, test_kernel: GuestKernel, firecracker_driver: FirecrackerDriver, vmm_reaper: list[VmmHandle]
) -> None:
    """Issue 15: Firecracker under the jailer, at API level: a chroot of its own, an unprivileged uid, seccomp,
    cgroup limits from the VM's size, and nothing of the jail left once it is gone."""
    if fcjail.wanted(firecracker_driver.binary) is None:
        pytest.skip("needs root and the jailer beside the firecracker binary (scripts/setup.sh installs both)")
    spec = make_spec(tmp_path, test_kernel.vmlinux, vcpus=2, initrd=test_kernel.initramfs)
    handle = await firecracker_driver.launch(spec)
    vmm_reaper.append(handle)
    root = fcjail.root_of(handle)
    assert root is not None and root.parent.parent == spec.run_dir / "firecracker"
    status = Path(f"/proc/{handle.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid > confine.VMM_UID_BASE
    # Its root is the chroot: the API socket is at the top of what it sees as /.
    assert Path(f"/proc/{handle.pid}/root/{fcjail.JAIL_API_SOCKET}").exists()
    assert not Path(f"/proc/{handle.pid}/root/etc/passwd").exists()
    # Its environment is emptied by the jailer; a restarted daemon still finds it, by its cgroup.
    assert process.tagged_pids(spec.run_dir) == [handle.pid]
    threads = [Path(t) / "status" for t in Path(f"/proc/{handle.pid}/task").iterdir()]
    filtered = [t.read_text() for t in threads if "Seccomp:\t2" in t.read_text()]
    assert filtered and all("NoNewPrivs:\t1" in text for text in filtered)  # Firecracker's own seccomp filters
    # The VM's disks are the VMM uid's, hard-linked into the chroot (the guest's writes land in the VM's files).
    disk = spec.disks[0].path
    assert disk.stat().st_uid == uid and (root / "disk0").stat().st_ino == disk.stat().st_ino
    version, found = cgroups.layout()
    if version is cgroups.Version.V1:
        group = found["memory"] / cgroups.PARENT / spec.run_dir.name
        limits = cgroups.Limits.for_vm(spec.vcpus, spec.memory_mib)
        assert (group / "memory.limit_in_bytes").read_text().strip() == str(limits.memory_bytes)
        assert str(handle.pid) in (group / "cgroup.procs").read_text().split()
    await firecracker_driver.kill(handle)
    assert not (spec.run_dir / "firecracker").exists()
    assert disk.exists()  # the jail's link went, not the VM's disk
    assert "InstanceStart" in (spec.run_dir / fc.API_LOG).read_text()  # its logs came out of the chroot
