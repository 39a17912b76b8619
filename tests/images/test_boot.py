"""The init stub in a real boot: the Debian image plus a seed drive under QEMU microvm, and the missing-seed path.

The seed here is a stand-in made by this test (its init.py prints a marker and powers off); the real seed builder
and guest init belong to banger.guest and have their own tests.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.kernels.conftest import build_cached_kernel, host_tsc_khz

MARKER = "BANGER-SEED-INIT-RAN"
SEED_INIT = textwrap.dedent(
    f"""
    import asyncio, json, os, pty  # the modules banger's guest init relies on
    mounts = [line.split() for line in open("/proc/mounts")]
    seed = [m for m in mounts if m[1] == "/run/banger/seed"]
    meta = json.load(open("/etc/banger/image.json"))
    print("{MARKER}", json.dumps({{"pid": os.getpid(), "seed": seed, "preset": meta["preset"],
          "mounted": sorted({{m[1] for m in mounts}})}}), flush=True)
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("o")
    """
)


def _boot(kernel: Path, disks: list[Path], log: Path, timeout: float = 180) -> str:
    cmdline = (kernel / "cmdline").read_text().strip()
    argv = [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", f"file:{log}", "-monitor", "none",
        "-kernel", str(kernel / "vmlinux"), "-initrd", str(kernel / "initrd.img"),
        "-append", f"{cmdline} tsc_early_khz={host_tsc_khz()} init=/sbin/banger-init",
        "-device", "virtio-rng-device",
    ]  # fmt: skip
    for i, disk in enumerate(disks):
        argv += ["-drive", f"id=d{i},file={disk},format=raw,if=none", "-device", f"virtio-blk-device,drive=d{i}"]
    started = time.monotonic()
    subprocess.run(argv, timeout=timeout, check=True, capture_output=True)
    console = log.read_text(errors="replace")
    print(f"--- console ({time.monotonic() - started:.1f}s) ---\n{console}")
    return console


@pytest.fixture
def root_copy(debian_image: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the cached Debian image (the cache itself stays pristine)."""
    copy = tmp_path / "root.ext4"
    subprocess.run(["cp", "--sparse=always", str(debian_image), str(copy)], check=True)
    return copy


@pytest.mark.vm
def test_stub_mounts_seed_and_execs_its_init(root_copy: Path, tmp_path: Path) -> None:
    tree = tmp_path / "seed"
    tree.mkdir()
    (tree / "init.py").write_text(SEED_INIT)
    seed = tmp_path / "seed.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "BANGERSEED", "-d", str(tree), str(seed), "8M"], check=True)
    console = _boot(build_cached_kernel().dir, [root_copy, seed], tmp_path / "console.log")
    line = next((ln for ln in console.splitlines() if ln.startswith(MARKER)), None)
    assert line is not None, "the seed's init.py never ran"
    report = json.loads(line.removeprefix(MARKER))
    assert report["pid"] == 1 and report["preset"] == "debian"
    (seed_mount,) = report["seed"]
    assert seed_mount[0] == "/dev/vdb" and seed_mount[2] == "ext4" and seed_mount[3].split(",")[0] == "ro"
    assert {"/proc", "/sys", "/dev", "/run"} <= set(report["mounted"])
    assert "banger-init: ERROR" not in console


@pytest.mark.vm
def test_stub_without_seed_says_why_and_powers_off(root_copy: Path, tmp_path: Path) -> None:
    console = _boot(build_cached_kernel().dir, [root_copy], tmp_path / "console.log")
    assert "banger-init: ERROR: seed drive /dev/vdb (label BANGERSEED) is missing" in console
