"""VM lifecycle: `banger vm create` to agent-ready, `vm exec` latency, and host memory per running VM.

Boot: `banger vm create` (CLI wall time, which returns once the agent answers) and the time from QEMU's launch to
the agent's readiness line on the serial console, against a bare qemu-system-x86_64 run with the very argv banger
builds (QemuDriver.argv) on the same kernel, initrd, a copy of the same root disk and a seed drive of the same kind,
timed to the same console line. Both consoles are file chardevs watched by the same poller, and "launch" is the
QEMU process's start time from /proc on both sides. Target: banger within 1.15x of bare QEMU.
Exec: `banger vm exec NAME -- true` p50/p95 next to `banger daemon status` (the floor of a CLI round trip).
Memory: RSS/PSS of each QEMU against the guest's configured RAM, and the daemon's RSS with 0, 1 and 3 VMs.
Always --net none: benchmarks run in the root network namespace, which must never be reconfigured.
Run (as root): .venv/bin/python bench/bench_vm.py [--runs 5] [--exec-runs 50] [--memory 512]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from banger.drivers import host
from banger.drivers.base import AgentChannel, AgentTransport, Disk, VmSpec
from banger.drivers.qemu import QemuDriver
from banger.guest.seed import SeedMeta, build_seed
from banger.vms.cmdline import GUEST_CMDLINE
from banger.vms.disk import clone_root_disk

BIN = Path(sys.executable).parent
BANGER = str(BIN / "banger")
KERNEL_CACHE = Path("/var/cache/banger-tests/kernel")
IMAGE_CACHE = Path("/var/cache/banger-tests/images/cache")
KERNEL, IMAGE, PRESET = "debian-cloud", "debian-bookworm", "debian"
INIT_START = b"banger-init: starting"
INIT_READY = b"banger-init: ready"
# The agent's last line once its servers run; on QEMU it also opens the virtio-serial port in the same loop.
AGENT_READY = b"banger-agent: listening"
MARKERS = (INIT_START, INIT_READY, AGENT_READY)
# Console lines take >1 s to appear under TCG; 10 ms keeps the stamp error well under 1% without burning a core.
POLL = 0.01
BOOT_TIMEOUT = 120.0


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cleanup_on_signals() -> None:
    """SIGINT and SIGTERM unwind the stack, so every context manager removes what it made (VMs, daemon, dirs)."""
    # A shell starts background jobs with SIGINT ignored; Python would then never raise KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done


def timed(argv: list[str], env: dict[str, str], timeout: float = 600) -> float:
    t0 = time.perf_counter()
    run(argv, env, timeout)
    return time.perf_counter() - t0


# -- watching a serial console file ------------------------------------------------------------------------------


class ConsoleWatch:
    """Stamps (perf_counter) when each marker first shows up in a console file that may not exist yet."""

    def __init__(self, find: Callable[[], Path | None], markers: tuple[bytes, ...]) -> None:
        self.find, self.markers = find, markers
        self.path: Path | None = None
        self.seen: dict[bytes, float] = {}
        self.text = b""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConsoleWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        f = None
        try:
            while not self._stop.is_set():
                if f is None:
                    self.path = self.find()
                    if self.path is not None:
                        f = open(self.path, "rb")
                if f is not None:
                    chunk = f.read()
                    if chunk:
                        now = time.perf_counter()
                        start = max(0, len(self.text) - 64)
                        self.text += chunk
                        with self._cond:
                            for m in self.markers:
                                if m not in self.seen and self.text.find(m, start) >= 0:
                                    self.seen[m] = now
                            self._cond.notify_all()
                        if len(self.seen) == len(self.markers):
                            return
                self._stop.wait(POLL)
        finally:
            if f is not None:
                f.close()

    def wait(self, marker: bytes, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
        """The stamp of `marker`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while marker not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    tail = self.text[-1500:].decode(errors="replace")
                    raise RuntimeError(f"no {marker.decode()!r} on {self.path}; console tail:\n{tail}")
                self._cond.wait(min(left, 0.5))
            return self.seen[marker]


def proc_start(pid: int) -> float:
    """When process `pid` started, on the perf_counter clock (10 ms resolution: clock ticks since boot)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def qemu_pid_for(console: Path) -> int:
    """The pid of the QEMU whose command line names a file in `console`'s VM directory (a console writer, not QEMU,
    may hold the log itself)."""
    needle = os.fsencode(console.parent) + b"/"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                if b"qemu-system" in cmd and needle in cmd:
                    return int(entry.name)
    raise RuntimeError(f"no QEMU process uses {console}")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of `pid` in KiB, from /proc/<pid>/smaps_rollup."""
    vals = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            vals[key] = int(rest.split()[0])
    return vals["Rss"], vals["Pss"]


def guest_ram_rss_kib(pid: int, memory_mib: int) -> int:
    """Resident KiB of QEMU's guest-RAM mapping: the anonymous (or memfd) mapping exactly the guest's size (microvm with
    under 3 GiB of RAM has one RAM block); the rest of QEMU's RSS is its own (TCG code cache, kernel image, libs)."""
    rss, size, anon = 0, 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            # Guest RAM is an anonymous mapping, or the shared memfd that makes snapshots possible.
            size, anon = hi - lo, len(head) < 6 or head[5].startswith("/memfd:memory-backend-memfd")
        elif head[0] == "Rss:" and anon and size == memory_mib * 2**20:
            rss += int(head[1])
    return rss


# -- a banger state root ------------------------------------------------------------------------------------------


def kernel_dir() -> Path:
    """The test suite's cached kernel built by this checkout's build code (built now if missing): an older build
    there would have an older initramfs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.kernels.conftest import build_cached_kernel

    return build_cached_kernel().dir


@dataclass
class Home:
    """A temporary BANGER_HOME and the environment that points the CLI at it."""

    path: Path
    env: dict[str, str]
    vms: list[str]

    def banger(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run([BANGER, *args], self.env, timeout)

    def create(self, name: str, memory: int) -> float:
        """`banger vm create` wall time."""
        self.vms.append(name)
        argv = [BANGER, "vm", "create", "--name", name, "--kernel", KERNEL, "--image", IMAGE]
        argv += ["--vmm", "qemu", "--net", "none", "--vcpus", "1", "--memory", str(memory)]
        return timed(argv, self.env, BOOT_TIMEOUT + 60)

    def remove(self, name: str) -> None:
        self.banger("vm", "rm", "-f", name)
        self.vms.remove(name)

    def daemon_pid(self) -> int:
        return int((self.path / "run" / "bangerd.lock").read_text().split()[0])


@contextlib.contextmanager
def banger_home(warm_images: bool = True, kernel: bool = True) -> Iterator[Home]:
    """A fresh state root (short path: QEMU's Unix sockets live under it); everything is removed on exit."""
    path = Path(tempfile.mkdtemp(prefix="bgb", dir="/tmp"))
    home = Home(path, dict(os.environ, BANGER_HOME=str(path)), [])
    try:
        if warm_images:
            (path / "cache").mkdir()
            (path / "cache" / "images").symlink_to(IMAGE_CACHE)
        home.banger("daemon", "start")  # so no timed command pays for the daemon's autostart
        if kernel:
            home.banger("kernel", "import", str(kernel_dir()), "--name", KERNEL)
        yield home
    finally:
        for name in list(home.vms):
            with contextlib.suppress(Exception):
                home.remove(name)
        subprocess.run([BANGER, "daemon", "stop"], env=home.env, capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


def image_file(home: Home, name: str) -> Path:
    """The ext4 file of image `name`."""
    out = home.banger("image", "show", name, "--json").stdout
    return Path(json.loads(out)["path"])


# -- bare QEMU on banger's own argv -------------------------------------------------------------------------------


def kernel_cmdline(kdir: Path) -> list[str]:
    """The kernel's default line without root/init, as the VM service does."""
    base = (kdir / "cmdline").read_text().split() if (kdir / "cmdline").is_file() else []
    return [a for a in base if not a.startswith(("root=", "init=", "rw", "ro"))]


@contextlib.contextmanager
def bare_qemu(spec: VmSpec) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-system-x86_64 started with QemuDriver.argv(spec) (as banger would), killed on exit."""
    caps = host.detect()
    driver = QemuDriver(caps.qemu.path or "qemu-system-x86_64", host.qemu_accel(caps))
    with contextlib.ExitStack() as stack:
        socks = []
        for sock_path in (spec.run_dir / "qmp.sock", spec.run_dir / "agent.sock"):
            sock_path.unlink(missing_ok=True)
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            s.bind(str(sock_path))
            s.listen(1)
            socks.append(s)
        agent_fd = socks[1].fileno() if spec.agent is not None else None
        argv = driver.argv(spec, socks[0].fileno(), agent_fd)
        out = stack.enter_context(open(spec.run_dir / "qemu.log", "wb"))
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=[s.fileno() for s in socks]
        )
        try:
            yield child
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()


def bare_spec(
    work: Path,
    kdir: Path,
    name: str,
    memory: int,
    initrd: Path | None,
    cmdline: str,
    disks: tuple[Disk, ...],
    agent: bool,
) -> VmSpec:
    """A VmSpec like the VM service builds, rooted in `work`."""
    run_dir = work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    console = work / "console.log"
    console.unlink(missing_ok=True)
    channel = AgentChannel(AgentTransport.VIRTIO_SERIAL, socket=run_dir / "agent.sock") if agent else None
    return VmSpec(
        name=name,
        vcpus=1,
        memory_mib=memory,
        kernel=kdir / "vmlinux",
        initrd=initrd,
        cmdline=cmdline,
        console_log=console,
        run_dir=run_dir,
        disks=disks,
        agent=channel,
    )


def boot_bare(spec: VmSpec, markers: tuple[bytes, ...]) -> dict[bytes, float]:
    """Boot `spec` under bare QEMU; seconds from the QEMU process's start to each marker on its console."""
    with ConsoleWatch(lambda: spec.console_log if spec.console_log.exists() else None, markers) as watch:
        with bare_qemu(spec) as child:
            launched = proc_start(child.pid)
            stamps = {m: watch.wait(m, BOOT_TIMEOUT, lambda: child.poll() is None) for m in markers}
    return {m: t - launched for m, t in stamps.items()}


def boot_banger(
    home: Home, name: str, memory: int, markers: tuple[bytes, ...] = MARKERS
) -> tuple[float, dict[bytes, float]]:
    """`banger vm create`: (CLI wall seconds, seconds from QEMU's start to each marker on the VM's console)."""
    before = set((home.path / "vms").glob("*/console.log"))

    def find() -> Path | None:
        new = set((home.path / "vms").glob("*/console.log")) - before
        return next(iter(new), None)

    with ConsoleWatch(find, markers) as watch:
        wall = home.create(name, memory)
        stamps = {m: watch.wait(m, 10.0) for m in markers}
    assert watch.path is not None
    launched = proc_start(qemu_pid_for(watch.path))
    return wall, {m: t - launched for m, t in stamps.items()}


# -- the benchmarks -----------------------------------------------------------------------------------------------


def bench_boot(home: Home, runs: int, memory: int) -> None:
    kdir = home.path / "kernels" / KERNEL
    image = image_file(home, IMAGE)
    work = home.path / "bare"
    work.mkdir()
    seed = work / "seed.ext4"
    build_seed(seed, SeedMeta(hostname="bare", vm_name="bare"))
    cmdline = " ".join([*kernel_cmdline(kdir), GUEST_CMDLINE])
    initrd = kdir / "initrd.img" if (kdir / "initrd.img").is_file() else None
    walls: list[float] = []
    ours: dict[bytes, list[float]] = {m: [] for m in MARKERS}
    bare: dict[bytes, list[float]] = {m: [] for m in MARKERS}
    for i in range(runs):
        root = work / "root.ext4"
        root.unlink(missing_ok=True)
        clone_root_disk(image, root, image.stat().st_size)
        disks = (Disk(root), Disk(seed, read_only=True))
        spec = bare_spec(work, kdir, "bare", memory, initrd, cmdline, disks, agent=True)
        for m, t in boot_bare(spec, MARKERS).items():
            bare[m].append(t)
        root.unlink()
        wall, stamps = boot_banger(home, f"boot{i}", memory)
        walls.append(wall)
        for m, t in stamps.items():
            ours[m].append(t)
        home.remove(f"boot{i}")
        log(
            f"boot run {i + 1}/{runs}: banger cli {wall:.2f}s agent {stamps[AGENT_READY]:.2f}s, "
            f"bare agent {bare[AGENT_READY][-1]:.2f}s"
        )
    floor = statistics.median(bare[AGENT_READY])
    print(f"\nboot to agent-ready ({runs} runs, 1 vCPU, {memory} MiB, QEMU TCG), seconds")
    fmin = min(bare[AGENT_READY])
    print(f"{'measure':<52} {'p50 s':>7} {'min s':>7} {'p50 x':>7} {'min x':>7}")
    rows = [
        ("bare qemu: launch -> 'banger-init: starting'", bare[INIT_START]),
        ("bare qemu: launch -> 'banger-init: ready'", bare[INIT_READY]),
        ("bare qemu: launch -> 'banger-agent: listening'", bare[AGENT_READY]),
        ("banger: qemu launch -> 'banger-init: starting'", ours[INIT_START]),
        ("banger: qemu launch -> 'banger-init: ready'", ours[INIT_READY]),
        ("banger: qemu launch -> 'banger-agent: listening'", ours[AGENT_READY]),
        ("banger vm create (CLI wall, returns on agent)", walls),
    ]
    for label, xs in rows:
        p50 = statistics.median(xs)
        print(f"{label:<52} {p50:7.2f} {min(xs):7.2f} {p50 / floor:7.2f} {min(xs) / fmin:7.2f}")
    # Other tenants of this host make single boots swing by 2x under TCG; the minimum is the least disturbed run.
    same = min(ours[AGENT_READY]) / fmin
    wall = min(walls) / fmin
    verdict = "PASS" if wall <= 1.15 else "MISS"
    print("target: banger <= 1.15x bare (x = ratio to bare 'banger-agent: listening', by p50 and by min)")
    print(f"  by min: same event {same:.2f}x, CLI wall {wall:.2f}x -> {verdict}")


def bench_exec(home: Home, runs: int) -> None:
    cases = {
        "banger daemon status (floor)": [BANGER, "daemon", "status"],
        # click + one RPC, no guest: separates the CLI's own cost from the trip through the agent.
        "banger vm show vm0": [BANGER, "vm", "show", "vm0"],
        # The fast path (cli/fast.py): the same RPC without click.
        "banger vm show vm0 --json": [BANGER, "vm", "show", "vm0", "--json"],
        "banger vm exec vm0 -- true": [BANGER, "vm", "exec", "vm0", "--", "true"],
    }
    for argv in cases.values():  # warm the page cache and the agent connection
        for _ in range(3):
            timed(argv, home.env)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):  # interleaved, so load from other work on the host hits both alike
        for name, argv in cases.items():
            results[name].append(timed(argv, home.env))
    floor = statistics.median(results["banger daemon status (floor)"])
    print(f"\nCLI round trips ({runs} runs each, interleaved)")
    print(f"{'command':<32} {'p50 ms':>8} {'p95 ms':>8} {'x floor':>8}")
    for name, xs in results.items():
        print(
            f"{name:<32} {statistics.median(xs) * 1000:8.1f} {pct(xs, 0.95) * 1000:8.1f} "
            f"{statistics.median(xs) / floor:8.2f}"
        )
    worst = max(
        statistics.median(results[k]) / floor for k in ("banger vm show vm0 --json", "banger vm exec vm0 -- true")
    )
    print(
        f"target (issue 14, item 6): vm exec and vm show --json p50 <= 2x daemon status -> worst {worst:.2f}x "
        + ("PASS" if worst <= 2.0 else "MISS")
    )


def vm_qemu_pid(home: Home, name: str) -> int:
    for console in (home.path / "vms").glob("*/console.log"):
        with contextlib.suppress(RuntimeError):
            pid = qemu_pid_for(console)
            if f"-name\0{name}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise RuntimeError(f"no QEMU for VM {name}")


def bench_memory(home: Home, memory: int, daemon_idle: int) -> None:
    daemon = home.daemon_pid()
    daemon_1 = memory_kib(daemon)[0]
    home.create("vm1", memory)
    home.create("vm2", memory)
    time.sleep(2)  # let the newest guests finish their boot-time allocations
    daemon_3 = memory_kib(daemon)[0]
    print(f"\nhost memory per running VM (guest configured with {memory} MiB; idle guests just booted)")
    print(f"{'process':<30} {'RSS MiB':>8} {'PSS MiB':>8} {'RSS/guest':>10} {'guest RAM':>10} {'QEMU own':>9}")
    for name in ("vm0", "vm1", "vm2"):
        pid = vm_qemu_pid(home, name)
        (rss, pss), ram = memory_kib(pid), guest_ram_rss_kib(pid, memory)
        cells = f"{rss / 1024:8.1f} {pss / 1024:8.1f} {rss / 1024 / memory:10.2f} {ram / 1024:10.1f}"
        print(f"{'qemu ' + name:<30} {cells} {(rss - ram) / 1024:9.1f}")
    print("  (guest RAM: resident part of the guest's memory; QEMU own: the rest, e.g. TCG's code cache)")
    print(f"{'bangerd, 0 VMs ever':<30} {daemon_idle / 1024:8.1f}")
    print(f"{'bangerd, 1 VM running':<30} {daemon_1 / 1024:8.1f}")
    print(f"{'bangerd, 3 VMs running':<30} {daemon_3 / 1024:8.1f}")
    print(f"bangerd RSS growth per VM (1 -> 3 VMs): {(daemon_3 - daemon_1) / 2 / 1024:.2f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="boots per side (banger and bare QEMU)")
    ap.add_argument("--exec-runs", type=int, default=50)
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--exec-only", action="store_true", help="only the CLI round trips (one VM, no boot or memory)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (banger's QEMU driver and image builds need it here)")
    cleanup_on_signals()
    with banger_home() as home:
        log(f"state root {home.path}; building image {IMAGE} (warm bootstrap cache)")
        home.banger("image", "build", IMAGE, "--preset", PRESET)
        daemon_idle = memory_kib(home.daemon_pid())[0]
        print(f"host load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        if not args.exec_only:
            bench_boot(home, args.runs, args.memory)
        home.create("vm0", args.memory)
        bench_exec(home, args.exec_runs)
        if not args.exec_only:
            bench_memory(home, args.memory, daemon_idle)
        print(f"\nhost load average at end: {os.getloadavg()[0]:.1f}; other tenants' load makes single runs swing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
