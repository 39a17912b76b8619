"""CLI latency: `banger daemon status` and `banger version` end to end with the daemon up.

Prints p50/p95 wall time over N runs next to `python3 -c pass` (the floor) measured in the same run,
and the ratio to the floor. Target: p50 within 3x of the floor.
Run: .venv/bin/python bench/bench_cli_latency.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, BANGER_HOME=home)
        subprocess.run([str(BIN / "banger"), "daemon", "start"], env=env, check=True, stdout=subprocess.DEVNULL)
        try:
            cases = {
                "python3 -c pass (floor)": [sys.executable, "-c", "pass"],
                "banger version": [str(BIN / "banger"), "version"],
                "banger daemon status": [str(BIN / "banger"), "daemon", "status"],
            }
            for argv in cases.values():  # warm the page cache
                timed(argv, env, 2)
            results = {name: timed(argv, env, args.runs) for name, argv in cases.items()}
        finally:
            subprocess.run([str(BIN / "banger"), "daemon", "stop"], env=env, check=False, stdout=subprocess.DEVNULL)
    floor = statistics.median(results["python3 -c pass (floor)"])
    print(f"{'command':<28} {'p50 ms':>8} {'p95 ms':>8} {'x floor':>8}")
    worst = 0.0
    for name, xs in results.items():
        p50 = statistics.median(xs)
        ratio = p50 / floor
        if name != "python3 -c pass (floor)":
            worst = max(worst, ratio)
        print(f"{name:<28} {p50 * 1000:8.1f} {pct(xs, 0.95) * 1000:8.1f} {ratio:8.2f}")
    verdict = "PASS" if worst <= 3.0 else "MISS"
    print(f"target: p50 <= 3.0x floor -> worst {worst:.2f}x {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
