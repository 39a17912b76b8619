"""Soak: many create/exec/rm cycles; the daemon's memory, descriptors and children must not grow (issue 9).

Each cycle boots a VM (`vm create`, which returns once its agent answers), runs `vm exec -- true`-like work, and
removes it (`vm rm -f`). The daemon's RSS, open file descriptors and child processes (zombies counted apart), plus
VMM and console-writer processes left on the host, are recorded after one warm-up cycle (the baseline: imports and
caches that load once are not growth) and after the last cycle, and printed as a table with the growth. Counts must
come back exactly; RSS may move by noise (RSS_NOISE_MIB or RSS_NOISE_RATIO, whichever is larger).
Always --net none: benchmarks run in the root network namespace, which must never be reconfigured.
Run (as root): .venv/bin/python bench/bench_soak.py [--cycles 200] [--memory 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_vm import BANGER, Home, banger_home, cleanup_on_signals, log, run

RSS_NOISE_MIB = 8.0
RSS_NOISE_RATIO = 0.10


@dataclass(frozen=True)
class Sample:
    """What the daemon holds, and what runs on its behalf, at one moment."""

    rss_mib: float
    fds: int
    children: int
    zombies: int
    vmms: int
    writers: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def _argv(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def sample(home: Home) -> Sample:
    pid = home.daemon_pid()
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    children = zombies = vmms = writers = 0
    marker = str(home.path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        if int(fields[1]) == pid:
            children += 1
            zombies += fields[0] == "Z"
        argv = _argv(int(entry.name))
        if marker in argv and fields[0] != "Z":
            vmms += b"qemu-system" in argv.split(b"\0")[0]
            writers += b"banger.drivers.consolelog" in argv
    return Sample(rss, fds, children, zombies, vmms, writers)


def cycle(home: Home, i: int, memory: int) -> float:
    name = f"soak{i}"
    t0 = time.monotonic()
    home.vms.append(name)
    run([BANGER, "vm", "create", "--name", name, "--net", "none", "--vcpus", "1", "--memory", str(memory)], home.env)
    out = run([BANGER, "vm", "exec", name, "--", "sh", "-c", "echo $((6 * 7)); head -c 65536 /dev/zero"], home.env)
    if not out.stdout.startswith("42\n"):
        raise RuntimeError(f"exec in {name} returned {out.stdout[:40]!r}")
    home.remove(name)
    return time.monotonic() - t0


def table(start: Sample, end: Sample) -> tuple[str, bool]:
    rows = [("daemon RSS (MiB)", start.rss_mib, end.rss_mib)]
    rows += [
        (label, float(getattr(start, key)), float(getattr(end, key)))
        for label, key in (
            ("daemon open fds", "fds"),
            ("daemon children", "children"),
            ("  of which zombies", "zombies"),
            ("VMM processes", "vmms"),
            ("console writers", "writers"),
        )
    ]
    lines = [f"{'metric':<22}{'start':>10}{'end':>10}{'growth':>10}  verdict"]
    ok_all = True
    for label, a, b in rows:
        if label.startswith("daemon RSS"):
            ok = b - a <= max(RSS_NOISE_MIB, RSS_NOISE_RATIO * a)
        else:
            ok = b <= a
        ok_all &= ok
        lines.append(f"{label:<22}{a:>10.1f}{b:>10.1f}{b - a:>+10.1f}  {'ok' if ok else 'GROWS'}")
    return "\n".join(lines), ok_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="create/exec/rm cycles (default 200)")
    parser.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    args = parser.parse_args()
    cleanup_on_signals()
    with banger_home() as home:
        home.banger("image", "build", "debian-bookworm", "--preset", "debian", timeout=1800)
        first = sample(home)
        durations = [cycle(home, 0, args.memory)]  # warm-up: lazy imports and caches load once
        start = sample(home)
        for i in range(1, args.cycles):
            durations.append(cycle(home, i, args.memory))
            if i % 20 == 0:
                s = sample(home)
                log(f"cycle {i}: RSS {s.rss_mib:.1f} MiB, {s.fds} fds, {s.children} children ({s.zombies} zombies)")
        time.sleep(1.0)  # let the last VM's console writer see its pipe close
        end = sample(home)
    text, ok = table(start, end)
    print(f"soak: {args.cycles} create/exec/rm cycles, mean {sum(durations) / len(durations):.1f}s per cycle")
    print(f"before warm-up: RSS {first.rss_mib:.1f} MiB, {first.fds} fds, {first.children} children")
    print(text)
    print("result: no growth beyond noise" if ok else "result: GROWTH beyond noise")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
