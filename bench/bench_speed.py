"""Issue 14's whole benchmark in one run: every figure it asks for, each against its floor measured in that run.

Runs these benchmarks one after another (each in its own state root, so none disturbs the next), shows their
output as it comes, and ends with every target line they printed:
- bench_snapshot --runs 10: clone and create-from-snapshot to agent-ready against a cold `vm create`, memory of
  10 clones against 10 cold VMs, disk per clone, the guest-bytecode and shared-memory boot comparisons;
- bench_boot --boot-only: cold boot phases against a busybox floor (item 5);
- bench_vm --exec-only: `vm exec` and `vm show` against `daemon status` (item 6);
- bench_cp: `vm cp` against the agent channel's own rate (item 6);
- bench_kernel_pull: `kernel pull` against `curl | zstd -dc | tar -x` (item 6);
- bench_density: many idle clones at once, memory and CPU each (item 7).
Run (as root): .venv/bin/python bench/bench_speed.py [--quick] [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# Each part: its script and its arguments, full and --quick. Timeouts are generous: TCG boots take seconds each.
PARTS: dict[str, tuple[list[str], list[str], float]] = {
    "snapshot": (["bench_snapshot.py", "--runs", "10"], ["bench_snapshot.py", "--runs", "2", "--boot-runs", "1"], 3600),
    "boot": (["bench_boot.py", "--boot-only"], ["bench_boot.py", "--boot-only", "--runs", "2"], 1800),
    "exec": (["bench_vm.py", "--exec-only"], ["bench_vm.py", "--exec-only", "--exec-runs", "20"], 1800),
    "cp": (["bench_cp.py"], ["bench_cp.py", "--size-mb", "32", "--runs", "2"], 1800),
    "pull": (["bench_kernel_pull.py"], ["bench_kernel_pull.py", "--runs", "3"], 1800),
    "density": (["bench_density.py"], ["bench_density.py", "--clones", "10", "--settle", "15"], 5400),
}
TARGET_WORDS = ("target", "PASS", "MISS", "MET")


def run_part(name: str, argv: list[str], timeout: float) -> tuple[int, list[str]]:
    """Run one benchmark, echoing its output; its exit status (-1 when it ran out of time) and the lines that state
    a target."""
    print(f"\n===== {name}: {' '.join(argv)}", flush=True)
    targets: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / argv[0]), *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    # SIGTERM on time-out or Ctrl-C: each benchmark then removes what it made (VMs, its daemon, its state root).
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    timer = threading.Timer(timeout, stop)
    timer.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if any(word in line for word in TARGET_WORDS) and not line.startswith("#"):
                targets.append(line.strip())
        status = proc.wait()
    except KeyboardInterrupt:
        stop()
        proc.wait(timeout=300)
        raise
    finally:
        timer.cancel()
    if expired.is_set():
        return -1, [*targets, f"did not finish within {timeout:.0f}s"]
    return status, targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs and 10 clones for density (a smoke run)")
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(PARTS), help="parts to leave out")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (banger's QEMU driver and image builds need it here)")
    summary: list[tuple[str, int, list[str]]] = []
    for name, (full, quick, timeout) in PARTS.items():
        if name in args.skip:
            continue
        status, targets = run_part(name, quick if args.quick else full, timeout)
        summary.append((name, status, targets))
    print("\n===== summary (each figure against its floor in its own part of this run)")
    for name, status, targets in summary:
        print(f"{name}: {'ok' if status == 0 else f'FAILED (exit {status})'}")
        for line in targets:
            print(f"  {line}")
    return 0 if all(status == 0 for _, status, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
