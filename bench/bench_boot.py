"""Build and boot: `banger kernel build`, `banger image build` (cold and warm) and image size, and guest boot time.

Each measurement sits next to a floor measured in the same run:
- kernel build (warm .deb cache) against `dpkg-deb -x` of the same .deb (unpacking alone);
- image build, warm (cached bootstrap) and cold (empty cache, downloads from Debian's archive), against
  `mkfs.ext4 -d` of the cached rootfs tree into an image of the same size (the one step a warm build cannot skip);
- time from QEMU's launch to `banger-init: starting` and to the agent's readiness line, against the same kernel
  booted with the same QEMU arguments (QemuDriver.argv) on a floor initramfs whose /init (static busybox) only
  prints a marker. Consoles are file chardevs watched the same way on both sides (see bench_vm.ConsoleWatch).
Always --net none. Run (as root): .venv/bin/python bench/bench_boot.py [--runs 3] [--skip-cold] [--boot-only]
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vm import (
    AGENT_READY,
    IMAGE,
    INIT_START,
    KERNEL,
    KERNEL_CACHE,
    PRESET,
    Home,
    banger_home,
    bare_spec,
    boot_banger,
    boot_bare,
    cleanup_on_signals,
    image_file,
    kernel_cmdline,
    log,
    run,
    timed,
)

BUSYBOX = Path("/bin/busybox")
# The kernel's own line as it hands over to the initramfs: the same event on both sides.
KERNEL_DONE = b"Run /init as init process"
INITRAMFS_START = b"banger-initramfs: started"
SWITCH_ROOT = b"banger-initramfs: switching root"
BOOT_MARKERS = (KERNEL_DONE, INITRAMFS_START, SWITCH_ROOT, INIT_START, AGENT_READY)
FLOOR_MARKER = b"banger-floor: init"
DEBS = KERNEL_CACHE / "debs"


# -- the floor initramfs ------------------------------------------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One entry of a newc ("070701") cpio archive, padded to 4 bytes."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def floor_initramfs(out: Path) -> None:
    """A gzipped cpio holding static busybox and an /init that prints FLOOR_MARKER on the console and waits."""
    init = b"#!/bin/busybox sh\n/bin/busybox echo '" + FLOOR_MARKER + b"'\nexec /bin/busybox sleep 3600\n"
    entries = [
        ("dev", 0o040755, b"", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("bin", 0o040755, b"", (0, 0)),
        ("bin/busybox", 0o100755, BUSYBOX.read_bytes(), (0, 0)),
        ("init", 0o100755, init, (0, 0)),
    ]
    body = b"".join(_cpio_entry(n, m, d, r, i + 1) for i, (n, m, d, r) in enumerate(entries))
    body += _cpio_entry("TRAILER!!!", 0)
    out.write_bytes(gzip.compress(body, compresslevel=6))


# -- measurements -------------------------------------------------------------------------------------------------


def row(label: str, xs: list[float], floor: list[float]) -> None:
    """One table line: p50 and min, each as a ratio to the floor's p50 and min."""
    p50, low = statistics.median(xs), min(xs)
    ratios = f"{p50 / statistics.median(floor):7.2f} {low / min(floor):7.2f}"
    print(f"{label:<56} {p50:7.2f}s {low:7.2f}s {ratios}")


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"{'measure':<56} {'p50':>8} {'min':>8} {'p50 x':>7} {'min x':>7}")


def bench_kernel(home: Home, runs: int) -> None:
    (home.path / "cache").mkdir(exist_ok=True)
    (home.path / "cache" / "debian").symlink_to(DEBS)
    debs = sorted(DEBS.glob("linux-image-*-cloud-amd64_*.deb"))
    if not debs:
        raise SystemExit(f"no cloud kernel .deb under {DEBS} (run the kernel tests once)")
    builds, floors = [], []
    for i in range(runs):
        with tempfile.TemporaryDirectory(dir=home.path) as unpack:
            floors.append(timed(["dpkg-deb", "-x", str(debs[-1]), unpack], home.env))
        argv = [str(Path(sys.executable).parent / "banger"), "kernel", "build", "--from", "debian", "--name", "kb"]
        builds.append(timed(argv + (["--force"] if i else []), home.env))
        log(f"kernel build run {i + 1}/{runs}: {builds[-1]:.2f}s (dpkg-deb -x {floors[-1]:.2f}s)")
    header(f"kernel build, warm .deb cache ({runs} runs)")
    row("dpkg-deb -x linux-image-*-cloud-amd64.deb (floor)", floors, floors)
    row("banger kernel build --from debian", builds, floors)


def cached_tree_of(output: str, cache: Path) -> Path:
    """The extracted bootstrap tree a warm build reused, named by the cache key in its progress output."""
    keys = re.findall(r"rootfs/([0-9a-f]{16,})\.tar", output)
    if not keys:
        raise RuntimeError(f"cannot tell which cached rootfs the build used from its output:\n{output[-800:]}")
    tree = cache / "rootfs" / f"{keys[-1]}.d"
    if not tree.is_dir():
        raise RuntimeError(f"{tree} is missing: the build did not leave its extracted tree")
    return tree


def mkfs_floor(tree: Path, size: int, work: Path, env: dict[str, str]) -> float:
    """Seconds for `mkfs.ext4 -d tree` into a sparse file of `size` bytes."""
    img = work / "floor.ext4"
    with open(img, "wb") as f:
        f.truncate(size)
    try:
        return timed(["mkfs.ext4", "-q", "-F", "-m", "0", "-d", str(tree), str(img), f"{size // 1024}k"], env)
    finally:
        img.unlink()


def build_image(home: Home, force: bool) -> tuple[float, str]:
    argv = [str(Path(sys.executable).parent / "banger"), "image", "build", IMAGE, "--preset", PRESET]
    t0 = time.perf_counter()
    done = run(argv + (["--force"] if force else []), home.env, timeout=900)
    return time.perf_counter() - t0, done.stdout + done.stderr


def bench_images(warm: Home, cold: Home | None, runs: int) -> None:
    walls, floors = [], []
    for i in range(runs):
        wall, output = build_image(warm, force=i > 0)
        walls.append(wall)
        image = image_file(warm, IMAGE)
        tree = cached_tree_of(output, warm.path / "cache" / "images")
        floors.append(mkfs_floor(tree, image.stat().st_size, warm.path, warm.env))
        log(f"warm image build run {i + 1}/{runs}: {wall:.2f}s (mkfs floor {floors[-1]:.2f}s)")
    cold_wall = None
    if cold is not None:
        log("cold image build (empty bootstrap cache: downloads from Debian's archive)")
        cold_wall, _ = build_image(cold, force=False)
    header(f"image build {IMAGE} (preset {PRESET}; warm: {runs} runs)")
    row("mkfs.ext4 -d <cached rootfs tree>, same size (floor)", floors, floors)
    row("banger image build, warm bootstrap cache", walls, floors)
    if cold_wall is not None:
        row("banger image build, cold (empty cache, downloads)", [cold_wall], floors)
    st = image.stat()
    tar = tree.with_suffix(".tar")
    print(f"image size: apparent {st.st_size / 2**20:.0f} MiB, allocated {st.st_blocks * 512 / 2**20:.0f} MiB")
    print(f"  (bootstrap tarball it came from: {tar.stat().st_size / 2**20:.0f} MiB)")


def bench_boot(home: Home, runs: int, memory: int) -> None:
    kdir = home.path / "kernels" / KERNEL
    work = home.path / "floor"
    work.mkdir()
    initrd = work / "floor.cpio.gz"
    floor_initramfs(initrd)
    cmdline = " ".join(kernel_cmdline(kdir))
    floor_kernel: list[float] = []
    floors: list[float] = []
    ours: dict[bytes, list[float]] = {m: [] for m in BOOT_MARKERS}
    for i in range(runs):
        spec = bare_spec(work, kdir, "floor", memory, initrd, cmdline, (), agent=False)
        stamps = boot_bare(spec, (KERNEL_DONE, FLOOR_MARKER))
        floor_kernel.append(stamps[KERNEL_DONE])
        floors.append(stamps[FLOOR_MARKER])
        _, stamps = boot_banger(home, f"boot{i}", memory, BOOT_MARKERS)
        for m, t in stamps.items():
            ours[m].append(t)
        home.remove(f"boot{i}")
        log(
            f"boot run {i + 1}/{runs}: init {stamps[INIT_START]:.2f}s agent {stamps[AGENT_READY]:.2f}s, "
            f"floor {floors[-1]:.2f}s"
        )
    header(f"guest boot from QEMU launch ({runs} runs, 1 vCPU, {memory} MiB, QEMU TCG)")
    row("floor: kernel prints 'Run /init as init process'", floor_kernel, floors)
    row("floor: busybox /init prints its marker (the floor)", floors, floors)
    row("banger VM: kernel prints 'Run /init as init process'", ours[KERNEL_DONE], floors)
    row("banger VM: 'banger-initramfs: started'", ours[INITRAMFS_START], floors)
    row("banger VM: 'banger-initramfs: switching root'", ours[SWITCH_ROOT], floors)
    row("banger VM: 'banger-init: starting'", ours[INIT_START], floors)
    row("banger VM: 'banger-agent: listening'", ours[AGENT_READY], floors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each warm build and of each boot")
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold image build (it downloads ~170 MiB)")
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--boot-only", action="store_true", help="measure guest boot only (no kernel or image builds)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (image builds and banger's QEMU driver need it here)")
    cleanup_on_signals()
    # The cold home has no kernel and an empty cache; it also serves the kernel build, whose .deb cache is warm.
    with banger_home(warm_images=False, kernel=False) as cold, banger_home() as warm:
        log(f"state roots: cold {cold.path}, warm {warm.path}")
        print(f"host load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        if args.boot_only:
            build_image(warm, False)
        else:
            bench_kernel(cold, args.runs)
            bench_images(warm, None if args.skip_cold else cold, args.runs)
        bench_boot(warm, args.runs, args.memory)
        print(f"\nhost load average at end: {os.getloadavg()[0]:.1f}; other tenants' load makes single runs swing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
