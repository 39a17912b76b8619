"""Fixtures for kernel tests: a real Debian cloud kernel built by banger (cached by inputs) and a QEMU boot helper.

`debian_kernel` is meant for reuse by any VM test: it yields a kernel directory holding vmlinux, initrd.img,
config, cmdline, modules/<ver> and manifest.json, exactly what `banger kernel build --from debian` produces.
Tests in other folders get it (and `static_busybox`, `microvm_boot`) by importing them into their own conftest.py:
`from tests.kernels.conftest import debian_kernel  # noqa: F401`. `build_cached_kernel()` and `boot_microvm()` are
plain functions for non-fixture use.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger import proc
from banger.errors import ToolError
from banger.fsutil import temp_sibling_dir
from banger.kernels import debian
from banger.kernels.manifest import CMDLINE, INITRD, VMLINUX
from banger.progress import no_progress

CACHE = Path("/var/cache/banger-tests/kernel")
DEBS = CACHE / "debs"
TEST_KERNEL_NAME = "debian-test"
ROOT_MARKER = "BANGER-TEST-ROOT-INIT-RAN"


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialise builds of one cache entry across concurrent pytest sessions."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def image_package(package: str = debian.DEFAULT_PACKAGE) -> debian.AptPackage:
    """The versioned image package behind a metapackage (asked of apt once per session)."""
    return debian.resolve_image_package(package)


def kernel_cache_key(package: str = debian.DEFAULT_PACKAGE) -> str:
    """The candidate package version plus a hash of banger's build code: a new either means a new build."""
    pkg = image_package(package)
    return f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{debian.build_inputs_digest()}"


@dataclass(frozen=True)
class BuiltKernel:
    dir: Path
    build_seconds: float | None  # None when it came from the cache


def build_cached_kernel(package: str = debian.DEFAULT_PACKAGE) -> BuiltKernel:
    """Build (or reuse) a Debian kernel under CACHE/<key>; the directory only appears complete."""
    key = kernel_cache_key(package)
    target = CACHE / key
    with cache_lock(key):
        if (target / "manifest.json").is_file():
            return BuiltKernel(target, None)
        started = time.monotonic()
        with temp_sibling_dir(target, "build") as tmp:
            out = tmp / "kernel"
            build = debian.build_debian_kernel(out, package=package, cache_dir=DEBS, progress=no_progress)
            build.manifest(TEST_KERNEL_NAME).write(out)
            out.rename(target)
        _prune_old_builds(keep=4)
        return BuiltKernel(target, time.monotonic() - started)


def _prune_old_builds(keep: int) -> None:
    """Each change to the build code makes a new ~150 MB entry; keep only the newest few."""
    builds = sorted(CACHE.glob("linux-image-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        shutil.rmtree(old)
        (CACHE / f".{old.name}.lock").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def debian_kernel() -> Path:
    """Directory of a banger-built Debian cloud kernel (vmlinux, initrd.img, config, cmdline, modules, manifest)."""
    return build_cached_kernel().dir


@pytest.fixture(scope="session")
def debian_vmlinuz() -> Path:
    """The package's own compressed boot/vmlinuz-* (a bzImage), cached beside the builds."""
    pkg = image_package()
    target = CACHE / f"vmlinuz_{pkg.name}_{pkg.version.replace(':', '%3a')}"
    with cache_lock(target.name):
        if not target.is_file():
            deb = debian.fetch_deb(pkg, DEBS, no_progress)
            with temp_sibling_dir(target, "unpack") as tmp:
                proc.run(["dpkg-deb", "-x", deb, tmp])
                (vmlinuz,) = (tmp / "boot").glob("vmlinuz-*")
                vmlinuz.rename(target)
    return target


@pytest.fixture(scope="session")
def static_busybox() -> Path:
    """busybox from Debian's busybox-static package (fully static, so it runs on any root disk)."""
    pkg = debian.apt_candidate(debian.BUSYBOX_PACKAGE)
    target = CACHE / f"busybox_{pkg.version.replace(':', '%3a')}"
    with cache_lock(target.name):
        if not target.is_file():
            deb = debian.fetch_deb(pkg, DEBS, no_progress)
            with temp_sibling_dir(target, "unpack") as tmp:
                proc.run(["dpkg-deb", "-x", deb, tmp])
                (tmp / "bin" / "busybox").rename(target)
    return target


def make_root_disk(path: Path, busybox: Path, init_script: str | None, size: str = "16M") -> Path:
    """An ext4 image (mkfs.ext4 -d, no root mount needed) with busybox and, if given, /sbin/init."""
    tree = path.with_name(path.name + ".tree")
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    if init_script is not None:
        init = tree / "sbin" / "init"
        init.write_text(init_script)
        init.chmod(0o755)
    proc.run(["mkfs.ext4", "-q", "-F", "-d", tree, path, size], step="mkfs.ext4")
    shutil.rmtree(tree)
    return path


def host_tsc_khz() -> int:
    """The host's TSC rate in kHz, for tsc_early_khz= (TCG guests otherwise sometimes hang calibrating)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":", 1)[1]) * 1000)
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo")


@dataclass(frozen=True)
class BootResult:
    console: str
    seconds: float
    timed_out: bool


BootFn = Callable[..., BootResult]


def boot_microvm(
    kernel_dir: Path, disk: Path | None, *, append: str = "", log: Path, timeout: float = 120
) -> BootResult:
    """Boot kernel_dir under QEMU microvm with TCG until the guest powers off; the serial console goes to `log`."""
    cmdline = f"{(kernel_dir / CMDLINE).read_text().strip()} tsc_early_khz={host_tsc_khz()} {append}".strip()
    argv: list[str | Path] = [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{log}", "-monitor", "none",
        "-kernel", kernel_dir / VMLINUX, "-initrd", kernel_dir / INITRD, "-append", cmdline,
        "-device", "virtio-rng-device",
    ]  # fmt: skip
    if disk is not None:
        argv += ["-drive", f"id=root,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=root"]
    started = time.monotonic()
    timed_out = False
    try:
        proc.run(argv, timeout=timeout, step="qemu boot")
    except ToolError as exc:
        if "timed out" not in str(exc):
            raise
        timed_out = True
    seconds = time.monotonic() - started
    console = log.read_text(errors="replace") if log.exists() else ""
    # Shown by pytest when the test fails: the guest's own account of what happened.
    print(f"--- console ({seconds:.1f}s{', TIMED OUT' if timed_out else ''}) ---\n{console}")
    return BootResult(console, seconds, timed_out)


@pytest.fixture
def microvm_boot(tmp_path: Path) -> BootFn:
    """Boot a kernel dir (+ optional root disk) under QEMU microvm TCG; returns the console text and timing."""
    counter = iter(range(1_000_000))

    def boot(kernel_dir: Path, disk: Path | None, *, append: str = "", timeout: float = 120) -> BootResult:
        return boot_microvm(
            kernel_dir, disk, append=append, log=tmp_path / f"console-{next(counter)}.log", timeout=timeout
        )

    return boot
