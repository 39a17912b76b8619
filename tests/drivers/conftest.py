"""Fixtures for driver tests: a real Debian cloud kernel and a tiny busybox initramfs, cached by version."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger import proc
from banger.drivers import process
from banger.drivers.base import VmmHandle
from banger.drivers.firecracker import FirecrackerDriver
from banger.drivers.host import HostCaps, detect, qemu_accel
from banger.drivers.qemu import QemuDriver
from banger.fsutil import temp_sibling_dir
from banger.kernels import debian
from banger.kernels.vmlinux import extract_vmlinux
from banger.progress import no_progress

CACHE = Path("/var/cache/banger-tests/drivers")
DEBS = Path("/var/cache/banger-tests/kernel/debs")  # shared with the kernel tests' download cache
REPO = Path(__file__).resolve().parents[2]
# Loaded in this order by the test init: virtio transport first, then what the tests poke at.
MODULES = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/char/virtio_console.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/input/evdev.ko",
    "kernel/drivers/acpi/button.ko",
)

# The guest's whole userland. `banger_test=powerbutton` makes it power off on the ACPI power button
# (what a real distro's logind does); `banger_test=ignore` makes it ignore the button like a hung guest.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/banger/*.ko; do insmod "$m"; done
for p in /sys/class/virtio-ports/*; do
  if [ "$(cat "$p/name" 2>/dev/null)" = org.banger.agent ]; then
    echo "hello from $(basename "$p")" > "/dev/$(basename "$p")"
  fi
done
for b in /sys/block/vd*; do
  [ -e "$b" ] && echo "BANGER-DISK $(basename "$b") ro=$(cat "$b/ro") sectors=$(cat "$b/size")"
done
echo BANGER-TEST-INIT-UP
case "$(cat /proc/cmdline)" in
  *banger_test=powerbutton*)
    while [ ! -e /dev/input/event0 ]; do sleep 0.1; done
    echo BANGER-WAITING-FOR-POWER-BUTTON
    head -c 1 /dev/input/event0 > /dev/null
    echo BANGER-POWERING-OFF
    poweroff -f ;;
esac
echo BANGER-IGNORING-POWER-BUTTON
while true; do sleep 3600; done
"""


@dataclass(frozen=True)
class GuestKernel:
    version: str
    vmlinuz: Path
    vmlinux: Path  # the ELF image Firecracker wants
    initramfs: Path


@pytest.fixture
def anyio_backend() -> str:
    # The drivers use asyncio directly (pidfd readers, asyncio.timeout).
    return "asyncio"


def _build(dest: Path, pkg: debian.AptPackage) -> None:
    deb = debian.fetch_deb(pkg, DEBS, no_progress)
    with temp_sibling_dir(dest, "build") as work:
        proc.run(["dpkg-deb", "-x", deb, work / "x"], step="unpack kernel")
        (vmlinuz,) = (work / "x/boot").glob("vmlinuz-*")
        (moddir,) = (work / "x/lib/modules").iterdir()
        root = work / "root"
        for d in ("bin", "proc", "sys", "dev", "lib/banger"):
            (root / d).mkdir(parents=True)
        shutil.copy(proc.which("busybox"), root / "bin/busybox")
        for i, mod in enumerate(MODULES):
            shutil.copy(moddir / mod, root / "lib/banger" / f"{i:02d}-{Path(mod).name}")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        names = proc.run(["find", "."], cwd=root, step="list initramfs").stdout
        cpio = proc.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names, step="cpio").stdout
        out = work / "out"
        out.mkdir()
        shutil.copy(vmlinuz, out / "vmlinuz")
        extract_vmlinux(vmlinuz, out / "vmlinux")
        (out / "initramfs.cpio").write_bytes(cpio)
        out.rename(dest)


@pytest.fixture(scope="session")
def test_kernel() -> GuestKernel:
    """Debian's cloud kernel (bzImage and ELF vmlinux) plus a busybox initramfs with the few modules tests need."""
    pkg = debian.resolve_image_package(debian.DEFAULT_PACKAGE)
    digest = hashlib.sha256((INIT + "".join(MODULES)).encode()).hexdigest()[:12]
    dest = CACHE / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{digest}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".build.lock").open("w") as lock:
        # Concurrent pytest sessions would otherwise build the same entry twice.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.exists():
            _build(dest, pkg)
            for stale in CACHE.iterdir():
                # Older kernels or init scripts: each entry is only ever used by its exact key.
                if stale.is_dir() and stale != dest and not stale.name.startswith("."):
                    shutil.rmtree(stale, ignore_errors=True)
    return GuestKernel(pkg.name, dest / "vmlinuz", dest / "vmlinux", dest / "initramfs.cpio")


def firecracker_bin() -> str:
    """The Firecracker binary scripts/setup.sh --dev installs into the venv (or one on PATH)."""
    venv = REPO / ".venv/bin/firecracker"
    if venv.exists():
        return str(venv)
    return proc.which("firecracker", hint="run scripts/setup.sh --dev")


@pytest.fixture(scope="session")
def host_caps() -> HostCaps:
    return detect(firecracker_bin=firecracker_bin())


@pytest.fixture
def qemu_driver(host_caps: HostCaps) -> QemuDriver:
    # On this machine that is TCG: its /dev/kvm is kvm_pvm, under which ordinary guest kernels hang.
    return QemuDriver(proc.which("qemu-system-x86_64"), qemu_accel(host_caps))


@pytest.fixture
def firecracker_driver() -> FirecrackerDriver:
    return FirecrackerDriver(firecracker_bin())


@pytest.fixture
def vmm_reaper() -> Iterator[list[VmmHandle]]:
    """Handles appended here are killed at teardown, and the test fails if any was still running."""
    handles: list[VmmHandle] = []
    yield handles
    survivors = [h for h in handles if process.matches(h)]
    for h in survivors:
        os.kill(h.pid, 9)
    assert not survivors, f"VMM processes left running: {[h.pid for h in survivors]}"


def console_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
