"""Tunnel vs. bridge: throughput and connect latency to one guest server, through banger's published-port tunnel
(host 127.0.0.1 -> daemon -> agent channel -> guest loopback) and through the bridge (the guest's address
directly, and a DNAT'ed `0.0.0.0:` publish), in one run.

Everything happens in a network namespace made here (the root namespace is never touched), with a daemon of its
own on a temporary state root. The guest runs one Python server: each connection gets one byte back per byte
received ("ping") or, after the request line "GET N", N bytes ("download").

    .venv/bin/python bench/bench_tunnel.py [--size-mb 64] [--connects 30]     (as root)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_GLOB = "/var/cache/banger-tests/kernel/linux-image-6.1.0-*-cloud-amd64_*"
IMAGE_CACHE = Path("/var/cache/banger-tests/images/cache")
BANGER = str(Path(sys.executable).parent / "banger")
GUEST_PORT = 8500
TUNNEL_PORT, DNAT_PORT = 18500, 18501
MB = 1_000_000

SERVER = f"""
import socket, threading
def serve(c):
    with c:
        line = c.recv(64)
        if line.startswith(b"GET "):
            left = int(line.split()[1]); chunk = bytes(1 << 20)
            while left > 0:
                n = min(left, len(chunk)); c.sendall(chunk[:n]); left -= n
        else:
            c.sendall(line[:1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {GUEST_PORT})); s.listen(64)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

# Runs in the namespace: connect latency (connect + 1-byte round trip) and download throughput to host:port.
CLIENT = """
import json, socket, statistics, sys, time
host, port, size, connects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lat = []
for _ in range(connects):
    t = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as c:
        c.sendall(b"p"); assert c.recv(1) == b"p"
    lat.append(time.perf_counter() - t)
t = time.perf_counter(); got = 0
with socket.create_connection((host, port), timeout=60) as c:
    c.sendall(f"GET {size}".encode()); buf = bytearray(1 << 20)
    while n := c.recv_into(buf):
        got += n
secs = time.perf_counter() - t
assert got == size, (got, size)
print(json.dumps({"latency_ms": statistics.median(lat) * 1000, "mb_s": size / secs / 1e6}))
"""


def run(argv: list[str], env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... failed: {done.stderr.strip()}")
    return done.stdout


def _warm_image_cache(env: dict[str, str]) -> None:
    """Make sure the shared rootfs cache holds this image's bootstrap: the namespace has no route to the mirror.

    A throwaway daemon in the root namespace builds it (an image build touches no network configuration).
    """
    prep = Path(tempfile.mkdtemp(prefix="bgbp", dir="/tmp"))
    penv = dict(env, BANGER_HOME=str(prep))
    try:
        (prep / "cache").mkdir(parents=True)
        (prep / "cache" / "images").symlink_to(IMAGE_CACHE)
        run([BANGER, "image", "build", "debian-bookworm", "--preset", "debian"], penv, timeout=1800)
    finally:
        subprocess.run([BANGER, "daemon", "stop"], env=penv, capture_output=True, timeout=60)
        shutil.rmtree(prep, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--connects", type=int, default=30)
    args = parser.parse_args()
    kernels = sorted(glob.glob(KERNEL_GLOB))
    if not kernels or os.geteuid() != 0:
        raise SystemExit("needs root and the test kernel cache (run tests/vms once first)")
    ns = f"banger-bench-{secrets.token_hex(3)}"
    home = Path(tempfile.mkdtemp(prefix="bgb", dir="/tmp"))
    env = dict(os.environ, BANGER_HOME=str(home), HOME=str(home))
    wrap = ["ip", "netns", "exec", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run([*wrap, "ip", "link", "set", "lo", "up"], check=True)
        (home / "cache").mkdir(parents=True)
        (home / "cache" / "images").symlink_to(IMAGE_CACHE)
        run([*wrap, BANGER, "kernel", "import", kernels[-1], "--name", "debian-cloud", "--distro", "debian"], env)
        _warm_image_cache(env)
        run([*wrap, BANGER, "image", "build", "debian-bookworm", "--preset", "debian"], env)
        run(
            [*wrap, BANGER, "vm", "create", "--name", "bench", "--vcpus", "1", "--memory", "512"]
            + ["--publish", f"{TUNNEL_PORT}:{GUEST_PORT}", "--publish", f"0.0.0.0:{DNAT_PORT}:{GUEST_PORT}"]
            + ["--forward-ports", "off"],
            env,
        )
        info = json.loads(run([*wrap, BANGER, "vm", "show", "bench", "--json"], env))
        run([*wrap, BANGER, "vm", "exec", "bench", "--", "sh", "-c",
             f"setsid python3 -c '{SERVER}' >/dev/null 2>&1 </dev/null & "
             f"for i in $(seq 600); do bash -c 'echo > /dev/tcp/127.0.0.1/{GUEST_PORT}' 2>/dev/null && exit 0; "
             "sleep 0.1; done; exit 1"], env)  # fmt: skip
        paths = [
            ("tunnel (127.0.0.1, published)", "127.0.0.1", TUNNEL_PORT),
            ("bridge (guest address)", str(info["ip"]), GUEST_PORT),
            ("bridge + DNAT (0.0.0.0 publish)", "172.30.77.1", DNAT_PORT),
        ]
        size = args.size_mb * MB
        results = {}
        for label, host, port in paths:
            out = run([*wrap, sys.executable, "-c", CLIENT, host, str(port), str(size), str(args.connects)], env)
            results[label] = json.loads(out)
        base = results[paths[1][0]]
        print(f"{'path':34} {'connect+rtt ms':>15} {'MB/s':>9} {'lat x':>7} {'MB/s x':>7}")
        for label, r in results.items():
            print(
                f"{label:34} {r['latency_ms']:15.2f} {r['mb_s']:9.1f} "
                f"{r['latency_ms'] / base['latency_ms']:7.2f} {r['mb_s'] / base['mb_s']:7.2f}"
            )
        print(f"({args.size_mb} MB download, median of {args.connects} connects; ratios against the bridge path)")
    finally:
        subprocess.run([*wrap, BANGER, "vm", "rm", "-f", "bench"], env=env, capture_output=True, timeout=120)
        subprocess.run([*wrap, BANGER, "daemon", "stop"], env=env, capture_output=True, timeout=60)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
