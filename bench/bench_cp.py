"""`vm cp` throughput (issue 14 item 6) against the agent channel's own rate, both ways, same VM, same file.

The floor is the channel without the copy: `vm exec -i NAME -- sh -c 'cat > FILE'` with the file on stdin (in),
and `vm exec NAME -- cat FILE` into a host file (out). Both go host CLI -> daemon -> agent over the same
virtio-serial port in the same frames; what `vm cp` adds on top (tar on both sides, the staging directory, the
rename into place, the checks on what the guest sends) is the ratio. Runs alternate so load drifts hit both.
Run (as root): .venv/bin/python bench/bench_cp.py [--size-mb 100] [--runs 3] [--memory 512]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vm import BANGER, IMAGE, PRESET, Home, banger_home, cleanup_on_signals, log

VM = "cpbench"


def timed_io(home: Home, argv: list[str], stdin: Path | None = None, stdout: Path | None = None) -> float:
    """Wall seconds of one CLI run with its stdin and stdout bound to files (or nothing)."""
    with contextlib.ExitStack() as stack:
        inp = stack.enter_context(open(stdin, "rb")) if stdin is not None else subprocess.DEVNULL
        out = stack.enter_context(open(stdout, "wb")) if stdout is not None else subprocess.DEVNULL
        t0 = time.perf_counter()
        done = subprocess.run(
            [BANGER, *argv], env=home.env, stdin=inp, stdout=out, stderr=subprocess.PIPE, timeout=1800, check=False
        )
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"banger {' '.join(argv)} failed: {done.stderr.decode(errors='replace')[-500:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (banger's QEMU driver needs it here)")
    cleanup_on_signals()
    size = args.size_mb * 2**20
    with banger_home() as home, tempfile.TemporaryDirectory(prefix="bgcp") as tmp_dir:
        tmp = Path(tmp_dir)
        src = tmp / "src.bin"
        with open(src, "wb") as f:  # incompressible: nothing on the way may shrink it
            for _ in range(args.size_mb):
                f.write(os.urandom(2**20))
        home.banger("image", "build", IMAGE, "--preset", PRESET)
        home.create(VM, args.memory)
        results: dict[str, list[float]] = {k: [] for k in ("cp_in", "raw_in", "cp_out", "raw_out")}
        for i in range(args.runs):
            results["cp_in"].append(timed_io(home, ["vm", "cp", str(src), f"{VM}:/root/cp.bin"]))
            results["raw_in"].append(
                timed_io(home, ["vm", "exec", "-i", VM, "--", "sh", "-c", "cat > /root/raw.bin"], stdin=src)
            )
            out = tmp / "out.bin"
            out.unlink(missing_ok=True)
            results["cp_out"].append(timed_io(home, ["vm", "cp", f"{VM}:/root/cp.bin", str(out)]))
            if out.stat().st_size != size:
                raise SystemExit(f"vm cp out brought {out.stat().st_size} bytes, not {size}")
            out.unlink()
            results["raw_out"].append(timed_io(home, ["vm", "exec", VM, "--", "cat", "/root/raw.bin"], stdout=out))
            if out.stat().st_size != size:
                raise SystemExit(f"exec cat brought {out.stat().st_size} bytes, not {size}")
            log(
                f"run {i + 1}/{args.runs}: in cp {results['cp_in'][-1]:.1f}s raw {results['raw_in'][-1]:.1f}s, "
                f"out cp {results['cp_out'][-1]:.1f}s raw {results['raw_out'][-1]:.1f}s"
            )
        mb = size / 1e6
        print(f"\n`vm cp` of {args.size_mb} MiB against the agent channel ({args.runs} runs, 1 vCPU, QEMU TCG)")
        print(f"{'measure':<58} {'p50':>8} {'MB/s':>8} {'x floor':>8}")
        for way, label in (("in", "host -> guest"), ("out", "guest -> host")):
            raw, cp = statistics.median(results[f"raw_{way}"]), statistics.median(results[f"cp_{way}"])
            print(f"{'channel floor ' + label + ' (vm exec, cat)':<58} {raw:7.2f}s {mb / raw:8.1f} {1.0:8.2f}")
            print(f"{'vm cp ' + label:<58} {cp:7.2f}s {mb / cp:8.1f} {cp / raw:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
