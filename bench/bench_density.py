"""Density (issue 14 item 7): how many idle 256 MiB VMs this host holds, what each costs in memory and CPU.

In one run, QEMU TCG, 1 vCPU, --net none:
- the baseline: one cold `vm create` (the clones' source), idle, measured alone;
- N clones of it (`vm clone SRC --count N`, default 100), all idle together.
For each VM, host memory is the Pss of its QEMU plus its console writer: pages shared between processes (the
snapshot's RAM image in the page cache, QEMU's and Python's code) are split between their users, so the sum over
all VMs counts them once. CPU is what those processes used during a quiet window after a settling time. The
targets: at most 160 MB per VM, and N idle VMs taking less than the host's cores. A few clones are asked to run a
command at the end, so "held" means still answering.
Run (as root): .venv/bin/python bench/bench_density.py [--clones 100] [--memory 256] [--settle 30] [--window 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vm import IMAGE, PRESET, Home, banger_home, cleanup_on_signals, log, memory_kib, timed

TARGET_MB = 160
MAX_COUNT = 64  # what one `vm clone --count` takes
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class VmProcs:
    """The host processes of one VM: its QEMU and its console writer."""

    name: str
    pids: tuple[int, ...]


def vm_procs(home: Home, names: list[str]) -> list[VmProcs]:
    """Each VM's processes, found by its directory (QEMU names files in it; the writer holds its console.log)."""
    dirs = {}
    for name in names:
        info = json.loads(home.banger("vm", "show", name, "--json").stdout)
        dirs[name] = os.fsencode(home.path / "vms" / info["id"]) + b"/"
    found: dict[str, list[int]] = {n: [] for n in names}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        for name, needle in dirs.items():
            if needle in cmd:
                found[name].append(int(entry.name))
    return [VmProcs(n, tuple(p)) for n, p in found.items()]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@dataclass(frozen=True)
class Sample:
    pss_mb: list[float]  # per VM
    rss_mb: list[float]
    cpu_pct: list[float]  # per VM, % of one core over the window


def measure(vms: list[VmProcs], settle: float, window: float) -> Sample:
    log(f"settling {settle:.0f}s, then measuring {window:.0f}s")
    time.sleep(settle)
    before = {p: cpu_ticks(p) for vm in vms for p in vm.pids}
    t0 = time.monotonic()
    time.sleep(window)
    after = {p: cpu_ticks(p) for vm in vms for p in vm.pids}
    elapsed = time.monotonic() - t0
    pss, rss, cpu = [], [], []
    for vm in vms:
        mem = [memory_kib(p) for p in vm.pids]  # (Rss, Pss)
        rss.append(sum(m[0] for m in mem) / 1024)
        pss.append(sum(m[1] for m in mem) / 1024)
        ticks = sum(after[p] - before[p] for p in vm.pids)
        cpu.append(100 * ticks / CLK_TCK / elapsed)
    return Sample(pss, rss, cpu)


def row(label: str, xs: list[float], unit: str, base: float | None = None) -> None:
    p50 = statistics.median(xs)
    ratio = f"{p50 / base:7.2f}" if base else "       "
    print(f"{label:<46} {p50:8.1f}{unit:<3} {max(xs):8.1f}{unit:<3} {sum(xs):10.1f}{unit:<3} {ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clones", type=int, default=100, help="idle clones to hold at once")
    ap.add_argument("--memory", type=int, default=256, help="guest MiB")
    ap.add_argument("--settle", type=float, default=45.0, help="seconds of idling before a measurement")
    ap.add_argument("--window", type=float, default=30.0, help="seconds the CPU use is measured over")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (banger's QEMU driver needs it here)")
    cleanup_on_signals()
    with banger_home() as home:
        log(f"state root {home.path}")
        home.banger("image", "build", IMAGE, "--preset", PRESET)  # from the warm bootstrap cache
        home.create("src", args.memory)
        (cold,) = vm_procs(home, ["src"])
        base = measure([cold], args.settle, args.window)
        log(f"cold VM: Pss {base.pss_mb[0]:.0f} MB, CPU {base.cpu_pct[0]:.2f}%")
        # `vm clone --count` makes at most MAX_COUNT at a time: batches d1-1 ... d1-64, d2-1 ...
        batches = [min(MAX_COUNT, args.clones - i) for i in range(0, args.clones, MAX_COUNT)]
        names = [f"d{b}-{i}" for b, n in enumerate(batches, 1) for i in range(1, n + 1)]
        home.vms.extend(names)  # removed on exit, whatever happens
        wall = 0.0
        for b, n in enumerate(batches, 1):
            argv = [
                str(Path(sys.executable).parent / "banger"),
                "vm",
                "clone",
                "src",
                "--name",
                f"d{b}",
                "--count",
                str(n),
            ]
            wall += timed(argv, home.env, timeout=120 + 60 * n)
        log(f"{args.clones} clones ready in {wall:.0f}s ({wall / args.clones:.1f}s each)")
        clones = vm_procs(home, names)
        missing = [c.name for c in clones if len(c.pids) < 2]
        if missing:
            raise SystemExit(f"clones without their QEMU or console writer: {missing[:5]}")
        held = measure(clones, args.settle, args.window)
        answers = []
        for name in names[:: max(1, len(names) // 5)]:
            answers.append(
                timed([str(Path(sys.executable).parent / "banger"), "vm", "exec", name, "--", "true"], home.env)
            )
        daemon_rss = int(
            next(
                x for x in Path(f"/proc/{home.daemon_pid()}/status").read_text().splitlines() if x.startswith("VmRSS")
            ).split()[1]
        )
        meminfo = {
            k: int(v.split()[0]) for k, v in (x.split(":", 1) for x in Path("/proc/meminfo").read_text().splitlines())
        }
        cores = os.cpu_count() or 1
        print(f"\nidle VMs, {args.memory} MiB guest RAM, 1 vCPU, QEMU TCG; host {cores} CPUs")
        print(f"{'measure':<46} {'p50':>11} {'max':>11} {'sum':>13} {'p50 x':>7}")
        row("cold VM (baseline): Pss, QEMU + console writer", base.pss_mb, " MB", base.pss_mb[0])
        row("cold VM (baseline): Rss", base.rss_mb, " MB")
        row("cold VM (baseline): CPU", base.cpu_pct, " % ", base.cpu_pct[0])
        row(f"{args.clones} clones held at once: Pss per VM", held.pss_mb, " MB", base.pss_mb[0])
        row(f"{args.clones} clones held at once: Rss per VM", held.rss_mb, " MB")
        row(f"{args.clones} clones held at once: CPU per VM", held.cpu_pct, " % ", base.cpu_pct[0])
        print(f"clone wall time: {wall:.0f}s for {args.clones} ({wall / args.clones:.2f}s each)")
        print(
            f"`vm exec -- true` on {len(answers)} clones while all idle: p50 {statistics.median(answers) * 1000:.0f} ms"
        )
        print(f"daemon RSS with {args.clones + 1} VMs: {daemon_rss / 1024:.0f} MB")
        print(f"host MemAvailable with all of them: {meminfo['MemAvailable'] / 2**20:.1f} GiB")
        per_vm = statistics.median(held.pss_mb)
        total_cpu = sum(held.cpu_pct)
        print(
            f"target: <= {TARGET_MB} MB per VM: {'MET' if per_vm <= TARGET_MB else 'MISS'} ({per_vm:.0f} MB); "
            f"{args.clones} idle VMs under {cores} cores: {'MET' if total_cpu < 100 * cores else 'MISS'} "
            f"({total_cpu / 100:.2f} cores)"
        )
        log("removing the clones")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
