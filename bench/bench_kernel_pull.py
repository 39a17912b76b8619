"""Benchmark: banger's `kernel pull` against `curl -s URL | zstd -dc | tar -x`, same bundle, same loopback server.

Builds a ~100 MB kernel-shaped bundle (a vmlinux plus a modules tree, half random and half compressible data),
serves it from a separate process on 127.0.0.1 (sendfile, so the server costs both sides the same), then times
several alternating runs of each and prints a table, the ratio of medians and the median of per-run ratios
(exit status 0 when the paired median is within 1.2x).

    .venv/bin/python bench/bench_kernel_pull.py [--runs 5] [--size-mb 100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from banger import proc
from banger.kernels.catalog import CatalogEntry
from banger.kernels.pull import pull_kernel

_ELF_HEADER = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00" + bytes(44)
_WORDS = b"module kernel virtio driver block net console memory page irq sched vfs ext4 init probe".split()


def _mixed(rng: random.Random, size: int) -> bytes:
    """Half random bytes, half text-like data that zstd compresses well."""
    half = size // 2
    text = b" ".join(rng.choice(_WORDS) for _ in range(half // 6 + 1))[: size - half]
    return rng.randbytes(half) + text


def build_bundle(work: Path, size_mb: int) -> Path:
    """A kernel-shaped .tar.zst of about `size_mb` MB of unpacked data, made with tarfile and the zstd CLI."""
    rng = random.Random(1234)
    tree = work / "tree"
    mods = tree / "modules" / "6.1.0-bench"
    vmlinux_size = size_mb * 4 // 10 << 20
    (tree / "modules").mkdir(parents=True)
    (tree / "vmlinux").write_bytes(_ELF_HEADER + _mixed(rng, vmlinux_size))
    (tree / "config").write_bytes(_mixed(rng, 200_000))
    left = (size_mb << 20) - vmlinux_size
    n = 0
    while left > 0:
        sub = mods / "kernel" / f"d{n % 40:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        size = min(left, rng.randint(20_000, 500_000))
        (sub / f"m{n:04d}.ko").write_bytes(_mixed(rng, size))
        left -= size
        n += 1
    tar_path = work / "bundle.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".", recursive=True)
    proc.run(["zstd", "-q", "-T0", "-3", "-f", tar_path, "-o", work / "bundle.tar.zst"], step="compress the bundle")
    tar_path.unlink()
    shutil.rmtree(tree)
    return work / "bundle.tar.zst"


def serve(directory: Path, port_file: Path) -> None:
    """Serve files of `directory` with sendfile until killed (runs in its own process)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = directory / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.flush()
            with path.open("rb") as f:
                self.connection.sendfile(f)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_file.write_text(str(httpd.server_address[1]))
    httpd.serve_forever()


def time_pipeline(url: str, dest: Path) -> float:
    """Wall time of curl -s URL | zstd -dc | tar -x -C dest."""
    dest.mkdir()
    t0 = time.perf_counter()
    curl = subprocess.Popen(["curl", "-sf", url], stdout=subprocess.PIPE)
    zstd = subprocess.Popen(["zstd", "-dc"], stdin=curl.stdout, stdout=subprocess.PIPE)
    assert curl.stdout is not None and zstd.stdout is not None
    curl.stdout.close()
    tar = subprocess.Popen(["tar", "-x", "-C", str(dest)], stdin=zstd.stdout)
    zstd.stdout.close()
    codes = (tar.wait(), zstd.wait(), curl.wait())
    elapsed = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"pipeline failed: tar/zstd/curl exit codes {codes}")
    return elapsed


def time_pull(entry: CatalogEntry, kernels: Path) -> float:
    """Wall time of banger's pull_kernel into a fresh kernels dir."""
    kernels.mkdir()
    t0 = time.perf_counter()
    asyncio.run(pull_kernel(entry, kernels))
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="reuse/keep the bundle in this directory")
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "PORTFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-kernel-pull."))
    bundle_dir = args.keep or work
    bundle_dir.mkdir(parents=True, exist_ok=True)
    bundle = bundle_dir / "bundle.tar.zst"
    if not bundle.exists():
        print(f"building a ~{args.size_mb} MB bundle ...", flush=True)
        build_bundle(bundle_dir, args.size_mb)
    data = bundle.read_bytes()
    port_file = work / "port"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(bundle_dir), str(port_file)])
    try:
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}/bundle.tar.zst"
        with socket.create_connection(("127.0.0.1", int(port_file.read_text())), timeout=5):
            pass
        entry = CatalogEntry(
            name="bench",
            distro="bench",
            arch="x86_64",
            kernel_version="6.1.0-bench",
            tarball_url=url,
            tarball_sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            description="benchmark bundle",
        )
        pipe_times: list[float] = []
        pull_times: list[float] = []
        for run in range(args.runs):
            order = [("pipe", pipe_times), ("pull", pull_times)]
            for kind, times in order if run % 2 == 0 else reversed(order):
                dest = work / f"{kind}-{run}"
                os.sync()  # start each run with no writeback left over from the previous one
                times.append(time_pipeline(url, dest) if kind == "pipe" else time_pull(entry, dest))
                shutil.rmtree(dest)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"bundle: {len(data) / 1e6:.1f} MB compressed, {args.size_mb} MiB unpacked; {args.runs} runs each")
        print(f"machine: {os.cpu_count()} CPUs, load average {load} (other processes skew both columns)")
        print(f"{'run':>4} {'curl|zstd|tar (s)':>18} {'banger pull (s)':>16} {'ratio':>7}")
        for i, (a, b) in enumerate(zip(pipe_times, pull_times, strict=True)):
            print(f"{i:>4} {a:>18.3f} {b:>16.3f} {b / a:>7.2f}")
        med_pipe, med_pull = statistics.median(pipe_times), statistics.median(pull_times)
        ratio = med_pull / med_pipe
        print(f"{'med':>4} {med_pipe:>18.3f} {med_pull:>16.3f} {ratio:>7.2f}")
        # Each run pairs the two back to back, so the paired ratio is less swayed by load from other processes.
        paired = statistics.median(b / a for a, b in zip(pipe_times, pull_times, strict=True))
        print(
            f"ratio of medians (pull / pipeline): {ratio:.2f}; median of paired ratios: {paired:.2f} (target <= 1.20)"
        )
        return 0 if paired <= 1.2 else 1
    finally:
        server.terminate()
        server.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
