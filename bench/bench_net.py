"""TCP throughput guest -> host: a banger VM on banger's bridge against a bare QEMU guest on a hand-made TAP.

Each side gets a network namespace of its own, made here; the root namespace is never touched. Both guests run the
same kernel, image, seed code, vCPUs, memory and QEMU device set (QemuDriver.argv), so only the network path
differs: banger's TAP on its bridge with its nft table and DNS, against a TAP that carries the host address itself.
A Python sender in the guest pushes --size-mb over one TCP connection to a Python receiver in the namespace, which
times accept -> EOF. Runs alternate between the two guests so drifting host load hits both alike; the median of
the per-run ratios (two back-to-back transfers each) is the figure least moved by other work on the host.

    .venv/bin/python bench/bench_net.py [--size-mb 1024] [--runs 7]     (as root)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from banger import proc
from banger.drivers import host
from banger.drivers.base import AgentChannel, AgentTransport, Disk, NetSpec, VmSpec
from banger.drivers.qemu import QemuDriver
from banger.errors import BangerError
from banger.guest.client import AgentClient
from banger.guest.seed import NetInterface, Network, SeedMeta, build_seed
from banger.kernels.manifest import INITRD, VMLINUX, read_manifest
from banger.net.guestnet import GUEST_MTU
from banger.vms.cmdline import GUEST_CMDLINE

log = logging.getLogger("bench_net")

HOST_ADDR = "172.30.77.1"  # banger's bridge address; the bare namespace puts the same address on its TAP
GUEST_ADDR = "172.30.77.2"
PREFIX = 24
PORT = 5201
BARE_TAP = "bench-tap0"
BARE_MAC = "52:54:00:be:4c:01"
VM_NAME = "netbench"
KERNEL_NAME = "bench-kernel"
IMAGE_NAME = "bench-bookworm"
KERNEL_GLOB = "/var/cache/banger-tests/kernel/linux-image-6.1.0-*-cloud-amd64_*"
IMAGE_CACHE = Path("/var/cache/banger-tests/images/cache")
MB = 1_000_000

# Runs inside the namespace: listen, say "ready", count bytes from accept to EOF, close, print JSON.
RECEIVER = """
import json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(timeout)
print("ready", flush=True)
conn, _ = srv.accept()
start = time.perf_counter()
conn.settimeout(timeout)
buf = bytearray(1 << 20)
total = 0
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    total += n
elapsed = time.perf_counter() - start
conn.close()
print(json.dumps({"bytes": total, "seconds": elapsed}), flush=True)
"""

# Runs in the guest: send `total` bytes, half-close, wait for the receiver's close so nothing is left in flight.
SENDER = """
import socket, sys, time
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chunk = memoryview(bytes(1 << 20))
sock = socket.create_connection((host, port), timeout=float(sys.argv[4]))
start = time.perf_counter()
left = total
while left > 0:
    n = min(left, len(chunk))
    sock.sendall(chunk[:n])
    left -= n
sock.shutdown(socket.SHUT_WR)
sock.recv(1)
print(time.perf_counter() - start)
"""


class BenchError(Exception):
    """A step of the benchmark failed; the message says which."""


@dataclass(frozen=True)
class Guest:
    """One side of the comparison: where its receiver listens and how to run a command in its guest."""

    label: str
    netns: str
    run: Callable[[list[str], float], str]


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM would end the process without unwinding; make it unwind so every cleanup runs.
    raise KeyboardInterrupt(f"signal {signum}")


def _quiet(step: str, fn: Callable[[], object]) -> None:
    """Run one cleanup step; a failure is logged and the remaining steps still run."""
    try:
        fn()
    except (BangerError, OSError, subprocess.SubprocessError) as exc:
        log.warning("cleanup: %s failed: %s", step, exc)


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A fresh network namespace with loopback up, deleted on exit."""
    proc.run(["ip", "netns", "add", name], step=f"create netns {name}")
    try:
        proc.run(["ip", "-n", name, "link", "set", "lo", "up"], step="loopback up")
        yield name
    finally:
        _quiet(f"delete netns {name}", lambda: proc.run(["ip", "netns", "del", name], step="delete netns"))


def _pids_of(home: Path) -> list[int]:
    """Processes this run started through banger: their command line or BANGER_HOME names `home`."""
    mark = os.fsencode(home)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in cmdline or b"BANGER_HOME=" + mark + b"\0" in environ:
            found.append(int(entry.name))
    return found


def _kill_leftovers(home: Path) -> None:
    for pid in _pids_of(home):
        log.warning("cleanup: pid %d of this run outlived `daemon stop`; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def banger_home() -> Iterator[tuple[Path, dict[str, str]]]:
    """A private BANGER_HOME (short path: Unix socket length) and the env that selects it; removed on exit."""
    home = Path(tempfile.mkdtemp(prefix="bgn", dir="/tmp"))
    try:
        if IMAGE_CACHE.is_dir():  # reuse the test suite's rootfs cache: no mmdebstrap run
            (home / "cache").mkdir()
            (home / "cache" / "images").symlink_to(IMAGE_CACHE)
        yield home, {"BANGER_HOME": str(home)}
    finally:
        _kill_leftovers(home)
        _quiet(f"remove {home}", lambda: shutil.rmtree(home))


def banger_guest(stack: contextlib.ExitStack, args: argparse.Namespace) -> tuple[Guest, Path, Path]:
    """Boot a VM through banger (daemon in its own namespace); return it, the image path and the kernel dir."""
    banger = str(Path(sys.executable).with_name("banger"))
    ns = stack.enter_context(netns(f"banger-bench-{os.getpid()}-b"))
    home, env = stack.enter_context(banger_home())

    def cli(*argv: str, timeout: float = 600) -> str:
        # Every call names BANGER_HOME: without it the CLI would start a daemon on the machine's own home.
        out = proc.run(["ip", "netns", "exec", ns, banger, *argv], env=env, step=f"banger {argv[0]}", timeout=timeout)
        return out.stdout.decode()

    def stop() -> None:
        _quiet("banger vm rm", lambda: cli("vm", "rm", "-f", VM_NAME, timeout=120))
        _quiet("banger daemon stop", lambda: cli("daemon", "stop", timeout=60))

    stack.callback(stop)
    print(f"banger: importing kernel {args.kernel_dir.name}, building image ...", flush=True)
    cli("kernel", "import", str(args.kernel_dir), "--name", KERNEL_NAME)
    cli("image", "build", IMAGE_NAME, "--preset", "debian", timeout=1800)
    print("banger: creating VM ...", flush=True)
    vm_argv = ["vm", "create", "--name", VM_NAME, "--kernel", KERNEL_NAME, "--image", IMAGE_NAME]
    cli(*vm_argv, "--vcpus", str(args.vcpus), "--memory", str(args.memory), "--vmm", "qemu", timeout=600)
    image = Path(next(i["path"] for i in json.loads(cli("image", "list", "--json")) if i["name"] == IMAGE_NAME))
    kernel_dir = Path(next(k["path"] for k in json.loads(cli("kernel", "list", "--json")) if k["name"] == KERNEL_NAME))
    pid = json.loads(cli("vm", "show", VM_NAME, "--json"))["pid"]
    qemu_argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    accel = qemu_argv[qemu_argv.index("-accel") + 1].split(",")[0]  # e.g. "tcg,tb-size=128"
    if accel != args.accel:
        raise BenchError(f"banger's QEMU runs with {accel} but the bare guest would use {args.accel}")

    def run(argv: list[str], timeout: float) -> str:
        return cli("vm", "exec", VM_NAME, "--", *argv, timeout=timeout)

    return Guest("banger (bridge + nft)", ns, run), image, kernel_dir


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.listen(1)
    return sock


def bare_guest(stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path, image: Path, kdir: Path) -> Guest:
    """Boot the same image and kernel with plain QEMU on a TAP made here, with the same seed code as banger's."""
    ns = stack.enter_context(netns(f"banger-bench-{os.getpid()}-q"))
    ip = ["ip", "-n", ns]
    proc.run([*ip, "tuntap", "add", "dev", BARE_TAP, "mode", "tap", "vnet_hdr"], step="create TAP")
    proc.run([*ip, "address", "add", f"{HOST_ADDR}/{PREFIX}", "dev", BARE_TAP], step="TAP address")
    proc.run([*ip, "link", "set", BARE_TAP, "up"], step="TAP up")
    vm = tmp / "bare"
    vm.mkdir()
    root, seed = vm / "root.ext4", vm / "seed.ext4"
    proc.run(["cp", "--reflink=auto", "--sparse=always", image, root], step="copy root disk")
    iface = NetInterface("eth0", BARE_MAC, GUEST_ADDR, PREFIX, HOST_ADDR, GUEST_MTU)
    build_seed(seed, SeedMeta(hostname="bare", vm_name="bare", network=Network((iface,))))
    manifest = read_manifest(kdir)
    # The same command line banger gives its guests (VmService._spec): the kernel's, minus root/init, plus banger's.
    base = [a for a in (manifest.cmdline or "").split() if not a.startswith(("root=", "init=", "rw", "ro"))]
    agent_sock = vm / "agent.sock"
    spec = VmSpec(
        name="bare",
        vcpus=args.vcpus,
        memory_mib=args.memory,
        kernel=kdir / VMLINUX,
        initrd=kdir / INITRD if (kdir / INITRD).is_file() else None,
        cmdline=" ".join([*base, GUEST_CMDLINE]),
        console_log=vm / "console.log",
        run_dir=vm,
        disks=(Disk(root), Disk(seed, read_only=True)),
        net=NetSpec(BARE_TAP, BARE_MAC),
        agent=AgentChannel(AgentTransport.VIRTIO_SERIAL, socket=agent_sock),
    )
    caps = host.detect()
    driver = QemuDriver(caps.qemu.path or "qemu-system-x86_64", args.accel)
    # The sockets exist before QEMU starts, so connecting needs no retry; QEMU keeps its own copies.
    with _listen(vm / "qmp.sock") as qmp, _listen(agent_sock) as agent, open(vm / "qemu.log", "wb") as qlog:
        argv = driver.argv(spec, qmp.fileno(), agent.fileno())
        qemu = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            pass_fds=(qmp.fileno(), agent.fileno()),
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill() -> None:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()

    stack.callback(kill)
    print("bare: waiting for the guest agent ...", flush=True)

    async def exec_in_guest(argv: list[str], timeout: float) -> str:
        client = await AgentClient.connect_unix(agent_sock, timeout=timeout)
        try:
            result = await client.run(argv, timeout=timeout)
        finally:
            await client.close()
        if not result.status.ok:
            raise BenchError(f"bare guest: {argv[0]} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode()

    def run(argv: list[str], timeout: float) -> str:
        if qemu.poll() is not None:
            raise BenchError(f"bare QEMU exited ({qemu.returncode}): {(vm / 'qemu.log').read_text().strip()[-300:]}")
        return asyncio.run(exec_in_guest(argv, timeout))

    guest = Guest("bare QEMU (own TAP)", ns, run)
    addr = guest.run(["ip", "-4", "-o", "address", "show", "dev", "eth0"], args.boot_timeout)
    if f"{GUEST_ADDR}/{PREFIX}" not in addr:
        raise BenchError(f"bare guest has no {GUEST_ADDR} on eth0: {addr.strip()}")
    return guest


def transfer(guest: Guest, size: int, timeout: float) -> float:
    """Send `size` bytes from the guest to a receiver in its namespace; return the receiver's MB/s."""
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", guest.netns, sys.executable, "-c", RECEIVER, HOST_ADDR, str(PORT), str(timeout)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None and receiver.stderr is not None
        if receiver.stdout.readline().strip() != "ready":
            raise BenchError(f"{guest.label}: receiver failed: {receiver.stderr.read().strip()}")
        guest.run(["python3", "-c", SENDER, HOST_ADDR, str(PORT), str(size), str(timeout)], timeout)
        out, err = receiver.communicate(timeout=timeout)
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait()
    if receiver.returncode != 0:
        raise BenchError(f"{guest.label}: receiver exited {receiver.returncode}: {err.strip()}")
    result = json.loads(out)
    if result["bytes"] != size:
        raise BenchError(f"{guest.label}: receiver got {result['bytes']} bytes, expected {size}")
    return float(result["bytes"]) / MB / float(result["seconds"])


def report(args: argparse.Namespace, results: dict[str, list[float]], load: tuple[float, float]) -> None:
    """Print one row per guest, the ratio of the medians, and the median of the per-run ratios."""
    print(f"\nguest -> host TCP, {args.size_mb} MB x {args.runs} runs, {args.vcpus} vCPU, {args.accel}")
    print(f"host load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after")
    print(f"{'case':<24} {'median MB/s':>12} {'min':>9} {'max':>9}   runs")
    for label, samples in results.items():
        runs = " ".join(f"{s:.1f}" for s in samples)
        print(f"{label:<24} {statistics.median(samples):>12.1f} {min(samples):>9.1f} {max(samples):>9.1f}   {runs}")
    banger, bare = results.values()
    # Each run's two transfers are back to back, so their ratio cancels most of the drift in host load.
    pairs = [a / b for a, b in zip(banger, bare, strict=True)]
    print(f"{'ratio banger/bare':<24} {statistics.median(banger) / statistics.median(bare):>12.2f}   of medians")
    print(f"{'':<24} {statistics.median(pairs):>12.2f}   median per run: " + " ".join(f"{r:.2f}" for r in pairs))


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    kernels = sorted(glob.glob(KERNEL_GLOB))
    parser.add_argument("--size-mb", type=int, default=1024, help="MB sent per run (default 1024)")
    parser.add_argument("--runs", type=int, default=7, help="measured runs per guest (default 7)")
    parser.add_argument("--warmup-mb", type=int, default=32, help="MB sent once per guest first, not counted")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=512, help="MiB per guest (default 512)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per transfer")
    parser.add_argument("--boot-timeout", type=float, default=300, help="seconds for the bare guest's agent")
    parser.add_argument(
        "--kernel-dir",
        type=Path,
        default=Path(kernels[0]) if kernels else None,
        help="an unpacked banger kernel (default: the test suite's cached Debian cloud kernel)",
    )
    args = parser.parse_args()
    if args.kernel_dir is None:
        parser.error(f"no kernel under {KERNEL_GLOB} (the test suite builds it); pass --kernel-dir")
    if min(args.size_mb, args.runs, args.vcpus) < 1:
        parser.error("--size-mb, --runs and --vcpus must be at least 1")
    args.accel = host.qemu_accel(host.detect())
    return args


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Boot both guests, warm each up, then alternate measured transfers; everything is torn down on return."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-net-")))
        try:
            banger, image, kdir = banger_guest(stack, args)
            bare = bare_guest(stack, args, tmp, image, kdir)
            guests = [banger, bare]
            for guest in guests:
                transfer(guest, args.warmup_mb * MB, args.timeout)
            results: dict[str, list[float]] = {g.label: [] for g in guests}
            for i in range(args.runs):
                for guest in guests if i % 2 == 0 else guests[::-1]:
                    mbps = transfer(guest, args.size_mb * MB, args.timeout)
                    results[guest.label].append(mbps)
                    print(f"run {i + 1}: {guest.label}: {mbps:.1f} MB/s", flush=True)
        except (BenchError, BangerError) as exc:
            raise SystemExit(f"bench_net: {exc}") from exc
    return results


def main() -> None:
    """Measure, then print the table."""
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_net needs root (network namespaces, TAP devices)")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    load_before = os.getloadavg()[0]
    try:
        results = measure(args)
    except KeyboardInterrupt:
        raise SystemExit("bench_net: interrupted (everything it made is removed)") from None
    report(args, results, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
