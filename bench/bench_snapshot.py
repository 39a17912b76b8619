"""Snapshots and clones against cold boots, and the guest-bytecode change of the cold boot, in one run.

Measured in the same run, all QEMU TCG, 1 vCPU, --net none; the three kinds of start interleaved, each once the
VMs already running are idle (a cold guest's first boot keeps working for seconds after it answers):
- cold `vm create` to agent-ready (CLI wall; it returns when the agent answers): the baseline;
- `vm clone SRC` to agent-ready (the snapshot of SRC, the restore, the new identity: all of it) and
  `vm create --from-snapshot SNAP` to agent-ready, each as a ratio to the cold create (target: <= 0.2x);
- host memory of N clones against N cold VMs: the sum of their QEMU processes' Pss (shared pages, such as the
  snapshot's RAM image in the page cache, are split between their users, so the sum counts them once), and RSS;
- disk per clone (allocated bytes of its overlay and seed) against a cold VM's root disk;
- cold boot phases with the seed drive's guest bytecode off and on (item 5), and with guest RAM in the shared
  memfd that snapshots need against QEMU's default anonymous RAM (what the memfd costs every VM), on bare QEMU
  with banger's argv.
Run (as root): .venv/bin/python bench/bench_snapshot.py [--runs 3] [--boot-runs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from banger.drivers.base import Disk
from banger.drivers.qemu import QemuDriver
from banger.guest.seed import SeedMeta, build_seed
from banger.vms.cmdline import GUEST_CMDLINE
from banger.vms.disk import clone_root_disk
from bench_vm import (
    AGENT_READY,
    BANGER,
    IMAGE,
    INIT_READY,
    INIT_START,
    KERNEL,
    PRESET,
    Home,
    banger_home,
    bare_spec,
    boot_bare,
    cleanup_on_signals,
    image_file,
    kernel_cmdline,
    log,
    memory_kib,
    timed,
    vm_qemu_pid,
)


def allocated(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


def vm_dir(home: Home, name: str) -> Path:
    return Path(json.loads(home.banger("vm", "show", name, "--json").stdout)["dir"])


def qemu_cpu_seconds() -> float:
    """CPU seconds used so far by every QEMU on the host."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != "qemu-system-x86":
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def settle(limit: float = 60.0, busy: float = 0.15) -> None:
    """Wait until the VMs already running are idle (all QEMUs together under `busy` of a core over a second), so
    that each measurement starts from the same quiet host: a cold guest's first boot goes on working for seconds
    after it answers (SSH host keys, among others)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = qemu_cpu_seconds()
        time.sleep(1.0)
        if qemu_cpu_seconds() - before < busy:
            return
    log(f"VMs still busy after {limit:.0f}s; measuring anyway")


def bench_restore(home: Home, runs: int, memory: int) -> None:
    home.create("src", memory)
    settle()
    snap = json.loads(home.banger("vm", "snapshot", "src", "--name", "s0", "--json").stdout)
    # Interleaved, each after the host settled: every kind of start sees the same VMs running around it.
    cold: list[float] = []
    clone: list[float] = []
    restored: list[float] = []
    for i in range(runs):
        settle()
        cold.append(home.create(f"cold{i}", memory))
        settle()
        home.vms.append(f"clone{i}")
        clone.append(timed([BANGER, "vm", "clone", "src", "--name", f"clone{i}"], home.env))
        settle()
        home.vms.append(f"rest{i}")
        restored.append(timed([BANGER, "vm", "create", "--from-snapshot", "s0", "--name", f"rest{i}"], home.env))
        log(f"run {i + 1}/{runs}: cold {cold[-1]:.2f}s, clone {clone[-1]:.2f}s, from snapshot {restored[-1]:.2f}s")
    base = statistics.median(cold)
    print(f"\nto agent-ready ({runs} runs each, 1 vCPU, {memory} MiB, QEMU TCG, --net none), seconds")
    print(f"{'measure':<44} {'p50 s':>7} {'min s':>7} {'x cold p50':>10}")
    for label, xs in (
        ("cold vm create (baseline)", cold),
        ("vm clone SRC (snapshot + restore + identity)", clone),
        ("vm create --from-snapshot SNAP", restored),
    ):
        print(f"{label:<44} {statistics.median(xs):7.2f} {min(xs):7.2f} {statistics.median(xs) / base:10.2f}")
    print(f"snapshot of SRC: guest paused {snap['pause_seconds']} s, {snap['size_bytes'] / 2**20:.0f} MiB on disk")
    for label, xs in (("clone", clone), ("create --from-snapshot", restored)):
        ratio = statistics.median(xs) / base
        print(f"target {label} <= 0.2x cold: {ratio:.2f}x -> {'PASS' if ratio <= 0.2 else 'MISS'}")

    time.sleep(3)  # let the newest guests settle
    print(f"\nhost memory, {runs} clones of one snapshot against {runs} cold VMs ({memory} MiB guests)")
    print(f"{'group':<28} {'sum Pss MiB':>12} {'sum RSS MiB':>12} {'Pss/VM MiB':>11}")
    sums = {}
    for label, names in (
        ("cold VMs", [f"cold{i}" for i in range(runs)]),
        ("clones", [f"rest{i}" for i in range(runs)]),
    ):
        stats = [memory_kib(vm_qemu_pid(home, n)) for n in names]
        pss, rss = sum(s[1] for s in stats) / 1024, sum(s[0] for s in stats) / 1024
        sums[label] = pss
        print(f"{label:<28} {pss:12.1f} {rss:12.1f} {pss / runs:11.1f}")
    print(f"clones / cold by Pss: {sums['clones'] / sums['cold VMs']:.2f}x")

    print("\ndisk per VM (allocated bytes)")
    cold_disk = allocated(vm_dir(home, "cold0"))
    clone_disk = statistics.median(allocated(vm_dir(home, f"rest{i}")) for i in range(runs))
    print(f"{'cold VM dir (root disk copy + seed)':<44} {cold_disk / 2**20:9.1f} MiB")
    print(f"{'clone VM dir (qcow2 overlay + seed)':<44} {clone_disk / 2**20:9.1f} MiB")
    print(f"{'snapshot (shared by all its clones)':<44} {snap['size_bytes'] / 2**20:9.1f} MiB")


def anonymous_ram(argv: list[str]) -> list[str]:
    """banger's QEMU argv with guest RAM as QEMU's default anonymous memory instead of the shared memfd."""
    out: list[str] = []
    skip = 0
    for i, arg in enumerate(argv):
        if skip:
            skip -= 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if (arg == "-object" and nxt.startswith("memory-backend-memfd")) or (
            arg == "-machine" and nxt.startswith("memory-backend=")
        ):
            skip = 1
            continue
        out.append(arg)
    return out


@contextlib.contextmanager
def ram_mode(anonymous: bool) -> Iterator[None]:
    """Within: QemuDriver.argv gives anonymous guest RAM (for the memfd cost comparison) when asked."""
    original = QemuDriver.argv
    if anonymous:
        QemuDriver.argv = lambda self, *a, **kw: anonymous_ram(original(self, *a, **kw))  # type: ignore[method-assign]
    try:
        yield
    finally:
        QemuDriver.argv = original  # type: ignore[method-assign]


def bench_boot_variants(home: Home, runs: int, memory: int) -> None:
    """Boot phases: seed bytecode off / on (item 5), and memfd vs anonymous guest RAM, interleaved, on bare QEMU."""
    kdir = home.path / "kernels" / KERNEL
    image = image_file(home, IMAGE)
    work = home.path / "variants"
    work.mkdir()
    seeds = {}
    for on in (False, True):
        seeds[on] = work / f"seed-{on}.ext4"
        build_seed(seeds[on], SeedMeta(hostname="bare", vm_name="bare"), bytecode=on)
    cmdline = " ".join([*kernel_cmdline(kdir), GUEST_CMDLINE])
    initrd = kdir / "initrd.img" if (kdir / "initrd.img").is_file() else None
    variants = {
        "bytecode off, memfd RAM": (False, False),
        "bytecode on, memfd RAM (banger now)": (True, False),
        "bytecode on, anonymous RAM": (True, True),
    }
    markers = (INIT_START, INIT_READY, AGENT_READY)
    stamps = {v: {m: [] for m in markers} for v in variants}
    for i in range(runs):
        for label, (bytecode, anonymous) in variants.items():
            root = work / "root.ext4"
            root.unlink(missing_ok=True)
            clone_root_disk(image, root, image.stat().st_size)
            disks = (Disk(root), Disk(seeds[bytecode], read_only=True))
            spec = bare_spec(work, kdir, "bare", memory, initrd, cmdline, disks, agent=True)
            with ram_mode(anonymous):
                for m, t in boot_bare(spec, markers).items():
                    stamps[label][m].append(t)
            log(f"boot {i + 1}/{runs} {label}: agent {stamps[label][AGENT_READY][-1]:.2f}s")
    print(f"\ncold boot phases ({runs} runs each, interleaved), seconds from QEMU launch (p50 / min)")
    print(f"{'variant':<38} " + " ".join(f"{m.decode()[:26]:>28}" for m in markers))
    for label in variants:
        cells = " ".join(
            f"{statistics.median(stamps[label][m]):13.2f} / {min(stamps[label][m]):6.2f}      " for m in markers
        )
        print(f"{label:<38} {cells}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="cold VMs, clones and restores (each kept for memory)")
    ap.add_argument("--boot-runs", type=int, default=2, help="bare boots per side for the bytecode comparison")
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--skip-restore", action="store_true", help="only the boot-phase comparisons")
    ap.add_argument("--skip-boot", action="store_true", help="skip the boot-phase comparisons")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (banger's QEMU driver needs it here)")
    cleanup_on_signals()
    with banger_home() as home:
        log(f"state root {home.path}; building image {IMAGE} (warm bootstrap cache)")
        home.banger("image", "build", IMAGE, "--preset", PRESET, timeout=1200)
        if not args.skip_restore:
            bench_restore(home, args.runs, args.memory)
        if not args.skip_boot:
            bench_boot_variants(home, args.boot_runs, args.memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
