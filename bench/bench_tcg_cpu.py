"""Boot cost of the TCG CPU model: `vm create` wall time and QEMU-start-to-agent time with `--cpu qemu64` (QEMU's
default) against `--cpu max` (banger's default `tcg_cpu`, which opencode and other x86-64-v2+ binaries need), in
the same run, alternating so load drifts hit both. Always --net none, 1 vCPU, 512 MiB.
Run (as root): .venv/bin/python bench/bench_tcg_cpu.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vm import AGENT_READY, IMAGE, KERNEL, PRESET, banger_home, cleanup_on_signals, log, timed

MODELS = ("qemu64", "max")


def boot(home, name: str, model: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(vm create wall seconds, seconds from QEMU's start to the agent's readiness line)."""
    argv = [str(Path(sys.executable).parent / "banger"), "vm", "create", "--name", name, "--kernel", KERNEL]
    argv += ["--image", IMAGE, "--vmm", "qemu", "--net", "none", "--vcpus", "1", "--memory", "512", "--cpu", model]
    home.vms.append(name)
    wall = timed(argv, home.env)
    console = next((home.path / "vms").glob("*/console.log"))
    text = console.read_bytes()
    home.remove(name)
    # The console log has no timestamps of its own: use the kernel's [   t.tttt] stamp nearest the marker.
    before = text.split(AGENT_READY, 1)[0].decode(errors="replace")
    stamps = [line for line in before.splitlines() if line.startswith("[")]
    kernel_t = float(stamps[-1][1:].split("]")[0]) if stamps else float("nan")
    return wall, kernel_t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cleanup_on_signals()
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODELS}
    with banger_home() as home:
        home.banger("image", "build", IMAGE, "--preset", PRESET)
        for i in range(args.runs):
            for model in MODELS:
                results[model].append(boot(home, f"cpu-{model}-{i}", model))
                log(f"run {i} {model}: create {results[model][-1][0]:.2f}s")
    base = statistics.median(w for w, _ in results["qemu64"])
    print(f"{'cpu model':<10} {'vm create (median s)':>22} {'last kernel stamp (s)':>22} {'ratio':>7}")
    for model in MODELS:
        wall = statistics.median(w for w, _ in results[model])
        stamp = statistics.median(k for _, k in results[model])
        print(f"{model:<10} {wall:>22.2f} {stamp:>22.2f} {wall / base:>7.2f}")


if __name__ == "__main__":
    main()
