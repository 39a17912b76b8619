"""Host capability detection and VMM selection, on this real host and on fabricated /sys trees."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from banger.drivers.base import VmmKind
from banger.drivers.host import HostCaps, KvmFlavor, ToolInfo, detect, host_tsc_khz, qemu_accel, select_vmm
from banger.errors import InvalidInputError, UnsupportedError

from .conftest import firecracker_bin


def fake_detect(
    tmp_path: Path, modules: tuple[str, ...], flags: str = "fpu vme", *, kvm: bool = True, **tools: str
) -> HostCaps:
    """detect() against a fabricated /sys/module, /proc/cpuinfo and /dev/kvm."""
    sys_module = tmp_path / "module"
    for mod in modules:
        (sys_module / mod).mkdir(parents=True)
    sys_module.mkdir(exist_ok=True)
    dev_kvm = tmp_path / "kvm"
    if kvm:
        dev_kvm.write_text("")
    return detect(sys_module=sys_module, cpuinfo=fake_cpuinfo(tmp_path, flags), dev_kvm=dev_kvm, **tools)


def fake_cpuinfo(tmp_path: Path, flags: str = "fpu vme") -> Path:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\ncpu MHz\t\t: 2000.500\n")
    return cpuinfo


def test_this_host(host_caps: HostCaps) -> None:
    """This machine: /dev/kvm is kvm_pvm, so KVM is present but not usable; both VMMs are installed."""
    assert host_caps.kvm_present
    assert host_caps.kvm_flavor is KvmFlavor.PVM
    assert not host_caps.kvm_usable
    assert "kvm_pvm" in host_caps.kvm_reason and "hang" in host_caps.kvm_reason
    assert host_caps.qemu.version is not None and host_caps.qemu.version.split(".")[0].isdigit()
    assert host_caps.firecracker.version == "1.12.1"
    json.dumps(host_caps.to_dict())  # doctor --json and RPC need it JSON-able
    assert host_caps.to_dict()["kvm_flavor"] == "pvm"
    findings = {f.check: f for f in host_caps.findings()}
    assert not findings["kvm"].ok and "kvm_pvm" in findings["kvm"].detail
    assert findings["qemu"].ok and findings["firecracker"].ok
    assert not findings["firecracker-usable"].ok
    assert findings["vmm-auto"].ok and findings["vmm-auto"].detail == "--vmm auto picks qemu with tcg"


def test_this_host_selection(host_caps: HostCaps) -> None:
    assert select_vmm("auto", host_caps) is VmmKind.QEMU
    assert select_vmm("qemu", host_caps) is VmmKind.QEMU
    assert qemu_accel(host_caps) == "tcg"
    with pytest.raises(UnsupportedError, match="firecracker needs working hardware KVM: .*kvm_pvm"):
        select_vmm("firecracker", host_caps)


def test_hardware_kvm(tmp_path: Path) -> None:
    caps = fake_detect(tmp_path, ("kvm", "kvm_amd"), "fpu svm", firecracker_bin=firecracker_bin())
    assert caps.kvm_flavor is KvmFlavor.HARDWARE and caps.kvm_usable
    assert caps.cpu_virt_flags == ("svm",)
    assert select_vmm("auto", caps) is VmmKind.FIRECRACKER
    assert select_vmm("firecracker", caps) is VmmKind.FIRECRACKER
    assert qemu_accel(caps) == "kvm"
    without_fc = dataclasses.replace(caps, firecracker=ToolInfo(None, None, "firecracker not found on PATH"))
    assert select_vmm("auto", without_fc) is VmmKind.QEMU
    with pytest.raises(UnsupportedError, match="firecracker not found"):
        select_vmm("firecracker", without_fc)
    old_fc = dataclasses.replace(caps, firecracker=ToolInfo("/x/firecracker", "1.7.0"))
    assert select_vmm("auto", old_fc) is VmmKind.QEMU
    with pytest.raises(UnsupportedError, match="1.7.0 is too old"):
        select_vmm("firecracker", old_fc)


def test_no_kvm(tmp_path: Path) -> None:
    caps = fake_detect(tmp_path, (), kvm=False)
    assert caps.kvm_flavor is KvmFlavor.NONE and not caps.kvm_present and not caps.kvm_usable
    assert "does not exist" in caps.kvm_reason
    assert qemu_accel(caps) == "tcg"


def test_unknown_vmm_and_missing_qemu(tmp_path: Path) -> None:
    caps = fake_detect(tmp_path, ("kvm", "kvm_intel"), "vmx", qemu_bin=str(tmp_path / "no-qemu"))
    assert caps.qemu.version is None and caps.qemu.problem
    with pytest.raises(InvalidInputError, match="unknown VMM 'xen'"):
        select_vmm("xen", caps)
    with pytest.raises(UnsupportedError, match="qemu is not usable"):
        select_vmm("qemu", caps)


def test_tsc_khz(tmp_path: Path) -> None:
    assert host_tsc_khz(fake_cpuinfo(tmp_path)) == 2000500
    assert (host_tsc_khz() or 0) > 100_000  # this host's CPU runs at more than 100 MHz
