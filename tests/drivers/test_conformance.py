"""What every VMM driver must do, checked against both real VMMs with the same test.

Only what both can do on this machine: QEMU boots its guest under TCG, while Firecracker's guest cannot execute
under this host's kvm_pvm (see test_firecracker.py); the process and socket lifecycle is common ground.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from banger.drivers import process
from banger.drivers.base import AgentChannel, AgentTransport, StopOutcome, VmmDriver, VmmHandle, VmmKind, VmSpec
from banger.drivers.firecracker import FirecrackerDriver
from banger.drivers.qemu import QemuDriver
from banger.errors import InvalidInputError

from .conftest import GuestKernel

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.firecracker]


@pytest.fixture(params=[VmmKind.QEMU, VmmKind.FIRECRACKER])
def driver(request: pytest.FixtureRequest) -> VmmDriver:
    fixture = "qemu_driver" if request.param is VmmKind.QEMU else "firecracker_driver"
    found: VmmDriver = request.getfixturevalue(fixture)
    return found


def spec_for(driver: VmmDriver, tmp_path: Path, kernel: GuestKernel) -> VmSpec:
    run = tmp_path / "run"
    if driver.kind is VmmKind.QEMU:
        image, agent = kernel.vmlinuz, AgentChannel(AgentTransport.VIRTIO_SERIAL, socket=run / "agent.sock")
    else:
        image, agent = kernel.vmlinux, AgentChannel(AgentTransport.VSOCK, socket=run / "agent.sock", guest_cid=3)
    return VmSpec(
        name="conformance",
        vcpus=1,
        memory_mib=256,
        kernel=image,
        initrd=kernel.initramfs,
        cmdline="console=ttyS0 panic=-1 rdinit=/init banger_test=ignore",
        console_log=tmp_path / "console.log",
        run_dir=run,
        agent=agent,
    )


async def test_lifecycle(
    driver: VmmDriver, tmp_path: Path, test_kernel: GuestKernel, vmm_reaper: list[VmmHandle]
) -> None:
    spec = spec_for(driver, tmp_path, test_kernel)
    handle = await driver.launch(spec)
    vmm_reaper.append(handle)
    assert handle.kind is driver.kind
    assert driver.is_alive(handle)
    assert stat.S_ISSOCK(handle.control_socket.stat().st_mode)
    assert spec.agent is not None and spec.agent.socket in handle.cleanup_paths
    assert stat.S_ISSOCK(spec.agent.socket.stat().st_mode)

    # The VMM sits in its own session, so it survives the daemon's process group going away.
    assert Path(f"/proc/{handle.pid}/stat").read_text().rsplit(")", 1)[1].split()[3] == str(handle.pid)

    record = handle.to_dict()
    assert driver.adopt(VmmHandle.from_dict(record)) == handle
    assert driver.adopt(VmmHandle.from_dict({**record, "start_time": handle.start_time + 1})) is None
    assert driver.adopt(VmmHandle.from_dict({**record, "control_socket": str(tmp_path / "gone.sock")})) is None

    await driver.kill(handle)
    assert not driver.is_alive(handle)
    assert process.start_time(handle.pid) is None
    assert driver.adopt(handle) is None
    assert not handle.control_socket.exists()
    assert not spec.agent.socket.exists()


# Launches a VM the way the daemon would, prints the stored record, and exits: the VMM must live on.
# With a TAP name it first creates that TAP, meant to run in a fresh network namespace (unshare --net).
LAUNCHER = """
import asyncio, json, sys
from pathlib import Path
from banger import proc
from banger.drivers.base import VmSpec, AgentChannel, AgentTransport, NetSpec
from banger.drivers.firecracker import FirecrackerDriver
from banger.drivers.qemu import QemuDriver
from banger.errors import InvalidInputError

async def main() -> None:
    args = json.loads(sys.argv[1])
    driver = QemuDriver(args["binary"], args["accel"]) if args["kind"] == "qemu" else FirecrackerDriver(args["binary"])
    net = None
    if args["tap"]:
        proc.run(["ip", "tuntap", "add", "dev", args["tap"], "mode", "tap"])
        proc.run(["ip", "link", "set", args["tap"], "up"])
        net = NetSpec(args["tap"], args["mac"])
    agent = args["agent"]
    spec = VmSpec(
        name="elsewhere", vcpus=1, memory_mib=256, kernel=Path(args["kernel"]), initrd=Path(args["initrd"]),
        cmdline=args["cmdline"], console_log=Path(args["console_log"]), run_dir=Path(args["run_dir"]),
        agent=AgentChannel(AgentTransport(agent["transport"]), Path(agent["socket"]), agent["guest_cid"]), net=net,
    )
    handle = await driver.launch(spec)
    print(json.dumps(handle.to_dict()))

asyncio.run(main())
"""
MAC = "02:42:ac:1e:4d:02"


def launch_elsewhere(driver: VmmDriver, spec: VmSpec, *, tap: str | None = None) -> VmmHandle:
    """Launch `spec` from a separate Python process that then exits, as a daemon that goes away would."""
    assert spec.agent is not None
    args = {
        "kind": driver.kind.value,
        "binary": driver.binary,
        "accel": getattr(driver, "accel", None),
        "kernel": str(spec.kernel),
        "initrd": str(spec.initrd),
        "cmdline": spec.cmdline,
        "console_log": str(spec.console_log),
        "run_dir": str(spec.run_dir),
        "agent": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(spec.agent).items()},
        "tap": tap,
        "mac": MAC,
    }
    prefix = ["unshare", "--net"] if tap else []
    out = subprocess.run(
        [*prefix, sys.executable, "-c", LAUNCHER, json.dumps(args)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        pytest.fail(f"launcher failed: {out.stderr[-3000:]}")
    return VmmHandle.from_dict(json.loads(out.stdout.strip().splitlines()[-1]))


async def test_vmm_outlives_its_launcher_and_is_adopted(
    driver: VmmDriver, tmp_path: Path, test_kernel: GuestKernel, vmm_reaper: list[VmmHandle]
) -> None:
    spec = spec_for(driver, tmp_path, test_kernel)
    handle = launch_elsewhere(driver, spec)
    vmm_reaper.append(handle)

    # The launcher (its "daemon") has exited; the VMM is not our child, yet it is found and controlled.
    adopted = driver.adopt(handle)
    assert adopted == handle
    assert driver.is_alive(adopted)
    await driver.kill(adopted)
    assert process.start_time(handle.pid) is None
    assert not handle.control_socket.exists()
    assert spec.agent is not None and spec.agent.socket is not None
    assert not spec.agent.socket.exists()


@pytest.mark.net
async def test_tap_network_in_a_namespace(
    driver: VmmDriver, tmp_path: Path, test_kernel: GuestKernel, vmm_reaper: list[VmmHandle]
) -> None:
    """The TAP and MAC reach the VMM's virtio-net device (TAP made in a private namespace, not the host's)."""
    spec = spec_for(driver, tmp_path, test_kernel)
    handle = launch_elsewhere(driver, spec, tap="bgtap0")
    vmm_reaper.append(handle)
    if isinstance(driver, QemuDriver):
        (nic,) = await driver.qmp(handle, "query-rx-filter")
        assert nic["main-mac"] == MAC
        network = await driver.qmp(handle, "human-monitor-command", {"command-line": "info network"})
        if "type=tap,fd=" in network:  # confined (drivers/confine.py): the daemon opened the TAP and passed it
            fd = network.split("type=tap,fd=")[1].split()[0]
            assert "iff:\tbgtap0" in Path(f"/proc/{handle.pid}/fdinfo/{fd}").read_text()
        else:
            assert "ifname=bgtap0" in network
    elif isinstance(driver, FirecrackerDriver):
        (iface,) = (await driver.vm_config(handle))["network-interfaces"]
        assert (iface["host_dev_name"], iface["guest_mac"]) == ("bgtap0", MAC)
    else:
        pytest.fail(f"no network check for {driver.kind}")
    await driver.kill(handle)
    assert not driver.is_alive(handle)


async def test_stop_of_a_guest_that_ignores_it_kills_after_timeout(
    driver: VmmDriver, tmp_path: Path, test_kernel: GuestKernel, vmm_reaper: list[VmmHandle]
) -> None:
    spec = spec_for(driver, tmp_path, test_kernel)
    handle = await driver.launch(spec)
    vmm_reaper.append(handle)
    # The QEMU guest ignores the power button (banger_test=ignore); Firecracker's guest cannot run here at all.
    assert await driver.stop(handle, timeout=2) is StopOutcome.KILLED
    assert not driver.is_alive(handle)
    assert not handle.control_socket.exists()
    assert await driver.stop(handle, timeout=2) is StopOutcome.ALREADY_GONE


@pytest.mark.parametrize("after", [0.0, 0.03, 0.15])
async def test_cancelled_launch_leaves_nothing(
    driver: VmmDriver, tmp_path: Path, test_kernel: GuestKernel, vmm_reaper: list[VmmHandle], after: float
) -> None:
    """Cancelled at any point, a launch either completes or leaves no process and no socket behind."""
    spec = spec_for(driver, tmp_path, test_kernel)
    try:
        handle = await asyncio.wait_for(driver.launch(spec), after)
    except TimeoutError:
        mine = [pid for pid in _pids() if str(tmp_path) in _cmdline(pid)]
        assert mine == [], f"cancelled launch left VMM processes {mine}"
        sockets = [p.name for p in spec.run_dir.glob("*") if p.is_socket()] if spec.run_dir.exists() else []
        assert sockets == []
    else:
        vmm_reaper.append(handle)
        await driver.kill(handle)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def test_socket_path_too_long_is_refused_before_anything_exists(
    driver: VmmDriver, tmp_path: Path, test_kernel: GuestKernel
) -> None:
    spec = spec_for(driver, tmp_path / ("d" * 120), test_kernel)
    with pytest.raises(InvalidInputError, match="socket path too long"):
        await driver.launch(spec)
    assert not spec.run_dir.exists()
