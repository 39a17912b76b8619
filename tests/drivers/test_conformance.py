"""What every VMM driver must do, checked against both real VMMs with the same test.

Only what both can do on this machine: QEMU boots its guest under TCG, while Firecracker's guest cannot execute
under this host's kvm_pvm (see test_firecracker.py); the process and socket lifecycle is common ground.
"""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from banger.drivers import process
from banger.drivers.base import AgentChannel, AgentTransport, VmmDriver, VmmHandle, VmmKind, VmSpec

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
LAUNCHER = """
import asyncio, json, sys
from pathlib import Path
from banger.drivers.base import VmSpec, AgentChannel, AgentTransport, VmmKind
from banger.drivers.firecracker import FirecrackerDriver
from banger.drivers.qemu import QemuDriver

async def main() -> None:
    args = json.loads(sys.argv[1])
    driver = QemuDriver(args["binary"], args["accel"]) if args["kind"] == "qemu" else FirecrackerDriver(args["binary"])
    agent = args["agent"]
    spec = VmSpec(
        name="readopt", vcpus=1, memory_mib=256, kernel=Path(args["kernel"]), initrd=Path(args["initrd"]),
        cmdline=args["cmdline"], console_log=Path(args["console_log"]), run_dir=Path(args["run_dir"]),
        agent=AgentChannel(AgentTransport(agent["transport"]), Path(agent["socket"]), agent["guest_cid"]),
    )
    handle = await driver.launch(spec)
    print(json.dumps(handle.to_dict()))

asyncio.run(main())
"""


async def test_vmm_outlives_its_launcher_and_is_adopted(
    driver: VmmDriver, tmp_path: Path, test_kernel: GuestKernel, vmm_reaper: list[VmmHandle]
) -> None:
    spec = spec_for(driver, tmp_path, test_kernel)
    assert spec.agent is not None and spec.agent.socket is not None
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
    }
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps(args)], capture_output=True, text=True, timeout=120, check=True
    )
    record = json.loads(out.stdout.strip().splitlines()[-1])
    handle = VmmHandle.from_dict(record)
    vmm_reaper.append(handle)

    # The launcher (its "daemon") has exited; the VMM is not our child, yet it is found and controlled.
    adopted = driver.adopt(handle)
    assert adopted == handle
    assert driver.is_alive(adopted)
    await driver.kill(adopted)
    assert process.start_time(handle.pid) is None
    assert not handle.control_socket.exists()
    assert not spec.agent.socket.exists()
