"""Workspaces: copy-in of a repo with many small files against a plain `vm cp` of one file of the same size, and
export time for 1,000 changed files.

Copy-in is `banger vm create --workspace` minus a plain `vm create` (so the boot is not counted): snapshot with a
temporary index, bundle, upload through the RPC and the agent, clone and checkout in the guest. The baseline is
`banger vm cp FILE VM:/root/` of one file of the bundle's size, which takes the same CLI -> daemon -> agent path
(as a tar stream), measured in the same run on the same host. Export is `banger vm workspace export` after the
guest changed 1,000 files (the guest commits and bundles, the CLI unbundles, fsck-fetches and makes the branch).
Always --net none: benchmarks run in the root network namespace, which must never be reconfigured.
Run (as root): .venv/bin/python bench/bench_workspace.py [--files 20000] [--kib 10] [--changed 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_vm import IMAGE, KERNEL, PRESET, banger_home, cleanup_on_signals, log, timed

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.org",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.org",
}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], env={**os.environ, **GIT_ENV}, check=True, capture_output=True)


def make_repo(root: Path, files: int, kib: int) -> Path:
    """`files` files of `kib` KiB of random bytes in 100 directories, committed."""
    repo = root / "benchrepo"
    for i in range(files):
        d = repo / f"d{i % 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.bin").write_bytes(os.urandom(kib * 1024))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bench")
    return repo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--kib", type=int, default=10, help="size of each file")
    ap.add_argument("--changed", type=int, default=1000, help="files the guest changes before the export")
    ap.add_argument("--memory", type=int, default=1024)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (banger's QEMU driver and image builds need it here)")
    cleanup_on_signals()
    with banger_home() as home, tempfile.TemporaryDirectory(prefix="bgw") as tmp:
        log(f"state root {home.path}; building image {IMAGE} (warm bootstrap cache)")
        home.banger("image", "build", IMAGE, "--preset", PRESET, timeout=1800)
        log(f"making a repo of {args.files} x {args.kib} KiB")
        repo = make_repo(Path(tmp), args.files, args.kib)
        size = args.files * args.kib * 1024
        base = ["--kernel", KERNEL, "--image", IMAGE, "--vmm", "qemu", "--net", "none", "--vcpus", "2"]
        base += ["--memory", str(args.memory), "--disk-size", "4G"]
        print(f"host load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")

        log("boot only (the part of create --workspace that is not the workspace)")
        home.vms.append("plain")
        t_boot = timed([*_banger(), "vm", "create", "--name", "plain", *base], home.env, 900)
        log("create --workspace")
        home.vms.append("ws")
        t_ws_create = timed(
            [*_banger(), "vm", "create", "--name", "ws", *base, "--workspace", str(repo)], home.env, 3600
        )
        t_in = t_ws_create - t_boot

        big = Path(tmp) / "one-file.bin"
        with big.open("wb") as f:
            for _ in range(size // (1 << 20)):
                f.write(os.urandom(1 << 20))
            f.write(os.urandom(size % (1 << 20)))
        log("vm cp of one file of the same size into the plain VM")
        t_cp = timed([*_banger(), "vm", "cp", str(big), "plain:/root/one-file.bin"], home.env, 3600)

        log(f"guest changes {args.changed} files; export")
        change = f"set -e; i=0; for f in $(find . -name '*.bin' | head -n {args.changed}); do echo x >> $f; done"
        home.banger("vm", "exec", "ws", "--", "sh", "-c", change, timeout=1800)
        t_export = timed([*_banger(), "vm", "workspace", "export", "ws"], home.env, 3600)

        mib = size / (1 << 20)
        print(f"\n{'what':<48}{'seconds':>10}{'MiB/s':>10}")
        print(f"{'boot (vm create, no workspace)':<48}{t_boot:>10.1f}{'':>10}")
        print(f"{f'workspace in: {args.files} files, {mib:.0f} MiB':<48}{t_in:>10.1f}{mib / t_in:>10.1f}")
        print(f"{f'baseline: vm cp of one {mib:.0f} MiB file':<48}{t_cp:>10.1f}{mib / t_cp:>10.1f}")
        print(f"{f'export of {args.changed} changed files':<48}{t_export:>10.1f}{'':>10}")
        print(f"\nratio workspace-in / vm cp: {t_in / t_cp:.2f}x")
        print(f"host load average at end: {os.getloadavg()[0]:.1f}; other tenants' load makes single runs swing")
    return 0


def _banger() -> list[str]:
    return [str(Path(sys.executable).parent / "banger")]


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    log(f"total {time.monotonic() - start:.0f}s")
    raise SystemExit(code)
