"""What this host can run: KVM flavour, VMM binaries, vhost-vsock; and the VMM choice that follows."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from banger import proc
from banger.drivers.base import VmmKind
from banger.errors import BangerError, InvalidInputError, UnsupportedError

DEV_KVM = Path("/dev/kvm")
DEV_VHOST_VSOCK = Path("/dev/vhost-vsock")
SYS_MODULE = Path("/sys/module")


class KvmFlavor(StrEnum):
    """Which KVM implementation sits behind /dev/kvm."""

    HARDWARE = "hardware"  # kvm_intel / kvm_amd: VT-x or AMD-V, runs ordinary guest kernels
    PVM = "pvm"  # kvm_pvm: paravirtual nested KVM; ordinary guest kernels hang under it
    NONE = "none"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ToolInfo:
    """A VMM binary: where it is and what version it reports (None when absent or broken)."""

    path: str | None
    version: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Finding:
    """One line of `banger doctor`: what was checked, whether it is fine, and why."""

    check: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class HostCaps:
    """The host facts that decide which VMM and accelerator banger uses, each with a reason."""

    kvm_present: bool
    kvm_accessible: bool
    kvm_flavor: KvmFlavor
    cpu_virt_flags: tuple[str, ...]
    kvm_usable: bool
    kvm_reason: str
    qemu: ToolInfo
    firecracker: ToolInfo
    vhost_vsock: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form for `banger doctor --json` and RPC."""
        out = dataclasses.asdict(self)
        out["kvm_flavor"] = self.kvm_flavor.value
        out["cpu_virt_flags"] = list(self.cpu_virt_flags)
        out["findings"] = [dataclasses.asdict(f) for f in self.findings()]
        return out

    def findings(self) -> list[Finding]:
        """The checks `banger doctor` shows, each with its reason."""
        out = [Finding("kvm", self.kvm_usable, self.kvm_reason)]
        for name, tool in (("qemu", self.qemu), ("firecracker", self.firecracker)):
            ok = tool.version is not None
            out.append(Finding(name, ok, f"{tool.path} version {tool.version}" if ok else str(tool.problem)))
        fc_problem = _firecracker_problem(self)
        out.append(Finding("firecracker-usable", fc_problem is None, fc_problem or "firecracker can run guests here"))
        out.append(
            Finding(
                "vhost-vsock",
                self.vhost_vsock,
                f"{DEV_VHOST_VSOCK} present"
                if self.vhost_vsock
                else f"{DEV_VHOST_VSOCK} absent (QEMU uses virtio-serial)",
            )
        )
        try:
            kind = select_vmm("auto", self)
            out.append(Finding("vmm-auto", True, f"--vmm auto picks {kind.value}" + _accel_note(kind, self)))
        except BangerError as exc:
            out.append(Finding("vmm-auto", False, exc.message))
        return out


def _kvm_flavor(sys_module: Path) -> KvmFlavor:
    if (sys_module / "kvm_intel").exists() or (sys_module / "kvm_amd").exists():
        return KvmFlavor.HARDWARE
    if (sys_module / "kvm_pvm").exists():
        return KvmFlavor.PVM
    if (sys_module / "kvm").exists():
        return KvmFlavor.UNKNOWN
    return KvmFlavor.NONE


def _cpu_virt_flags(cpuinfo: Path) -> tuple[str, ...]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    return tuple(sorted(flags & {"vmx", "svm"}))


def _kvm_verdict(present: bool, accessible: bool, flavor: KvmFlavor, flags: tuple[str, ...]) -> tuple[bool, str]:
    if not present:
        return False, f"{DEV_KVM} does not exist (no KVM module loaded, or no virtualisation support)"
    if not accessible:
        return False, f"{DEV_KVM} is not readable and writable by this user (add it to the kvm group)"
    if flavor is KvmFlavor.PVM:
        return False, (
            "KVM here is kvm_pvm (paravirtual nested KVM): ordinary guest kernels hang under it, "
            "so guests must run under QEMU's TCG emulation"
        )
    if flavor is KvmFlavor.HARDWARE:
        return True, "hardware KVM (kvm_intel/kvm_amd) is loaded"
    if flags:
        return True, f"KVM is present and the CPU has {'/'.join(flags)}"
    return False, "KVM module is of unknown kind and the CPU shows no vmx/svm flag"


def _tool(configured: str | None, name: str) -> ToolInfo:
    path = configured if configured else shutil.which(name)
    if path is None:
        return ToolInfo(None, None, f"{name} not found on PATH")
    if not os.access(path, os.X_OK):
        return ToolInfo(path, None, f"{path} is not executable")
    try:
        out = proc.run_text([path, "--version"], timeout=20, step=f"{name} --version")
    except BangerError as exc:
        return ToolInfo(path, None, str(exc))
    match = re.search(r"v?(\d+\.\d+(?:\.\d+)?)", out)
    return ToolInfo(path, match.group(1) if match else out.strip()[:60])


def detect(
    *,
    qemu_bin: str | None = None,
    firecracker_bin: str | None = None,
    dev_kvm: Path = DEV_KVM,
    sys_module: Path = SYS_MODULE,
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> HostCaps:
    """Probe this host (the keyword paths exist so tests can point at a fabricated /sys tree)."""
    present = dev_kvm.exists()
    accessible = present and os.access(dev_kvm, os.R_OK | os.W_OK)
    flavor = _kvm_flavor(sys_module)
    flags = _cpu_virt_flags(cpuinfo)
    usable, reason = _kvm_verdict(present, accessible, flavor, flags)
    return HostCaps(
        kvm_present=present,
        kvm_accessible=accessible,
        kvm_flavor=flavor,
        cpu_virt_flags=flags,
        kvm_usable=usable,
        kvm_reason=reason,
        qemu=_tool(qemu_bin, "qemu-system-x86_64"),
        firecracker=_tool(firecracker_bin, "firecracker"),
        vhost_vsock=DEV_VHOST_VSOCK.exists(),
    )


# Older Firecrackers announce virtio devices only on the kernel command line, which our kernels ignore.
FIRECRACKER_MIN = (1, 8)


def _firecracker_problem(caps: HostCaps) -> str | None:
    """Why this host's Firecracker cannot run our guests, or None when it can."""
    version = caps.firecracker.version
    if version is None:
        return f"firecracker is not usable here: {caps.firecracker.problem}"
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < FIRECRACKER_MIN:
        return f"firecracker {version} is too old: banger's kernels need >= 1.8 (virtio devices described via ACPI)"
    if not caps.kvm_usable:
        return f"firecracker needs working hardware KVM: {caps.kvm_reason}"
    return None


def select_vmm(requested: str, caps: HostCaps) -> VmmKind:
    """Resolve `auto`/`qemu`/`firecracker` against the host; refuse up front what cannot run here."""
    if requested == "auto":
        if _firecracker_problem(caps) is None:
            return VmmKind.FIRECRACKER
        if caps.qemu.version is None:
            raise UnsupportedError(
                "no usable VMM on this host: " + (caps.qemu.problem or "qemu-system-x86_64 is broken"),
                hint="install the qemu-system-x86 package (scripts/setup.sh does)",
            )
        return VmmKind.QEMU
    try:
        kind = VmmKind(requested)
    except ValueError:
        raise InvalidInputError(f"unknown VMM {requested!r} (choose auto, qemu or firecracker)") from None
    if kind is VmmKind.FIRECRACKER:
        problem = _firecracker_problem(caps)
        if problem is not None:
            raise UnsupportedError(problem, hint="use --vmm qemu instead")
    elif caps.qemu.version is None:
        raise UnsupportedError(f"qemu is not usable here: {caps.qemu.problem}")
    return kind


def qemu_accel(caps: HostCaps) -> str:
    """`kvm` when hardware KVM can run our kernel, else `tcg`."""
    return "kvm" if caps.kvm_usable else "tcg"


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's CPU clock in kHz (for tsc_early_khz= under TCG), or None when unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    return round(float(match.group(1)) * 1000) if match else None


def _accel_note(kind: VmmKind, caps: HostCaps) -> str:
    return f" with {qemu_accel(caps)}" if kind is VmmKind.QEMU else ""
