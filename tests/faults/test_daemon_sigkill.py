"""The daemon SIGKILLed at random points of random operations (issue 9, item 12).

A seeded schedule (printed; set BANGER_FAULT_SEED to replay one) picks an operation and a moment, starts the
operation through the CLI, SIGKILLs the daemon at that moment, starts a new daemon and checks that `vm ls`
matches the VMMs that run and that nothing leaked (TAPs, nft rules, leases, VMM and console-writer processes,
VM directories, temp files, sockets, kernel and image files without rows). Mostly cheap operations (--no-start
creates, rm, kernel and image import/rm, cp); a few real starts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.foundation.test_daemon import wait_for
from tests.vms.conftest import KERNEL

from .conftest import TEMP_NAME, FaultEnv

pytestmark = [pytest.mark.vm, pytest.mark.faults, pytest.mark.net]

ITERATIONS = int(os.environ.get("BANGER_FAULT_ITERATIONS", "30"))
MAX_STARTS = 3


class Chaos:
    def __init__(self, fe: FaultEnv, rng: random.Random, kernel_dir: Path, rootfs: Path, scratch: Path) -> None:
        self.fe, self.rng, self.kernel_dir, self.rootfs, self.scratch = fe, rng, kernel_dir, rootfs, scratch
        self.starts = 0
        self.counter = 0

    def kernels(self) -> list[str]:
        return sorted(k for k in self.fe.kernel_names() if k.startswith("chaosk"))

    def images(self) -> list[str]:
        return sorted(i for i in self.fe.image_names() if i.startswith("chaosi"))

    def pick(self, vms: list[dict]) -> tuple[str, list[str], float]:  # type: ignore[type-arg]
        """(label, CLI args, seconds until the kill) for the next operation, given the current `vm ls`."""
        self.counter += 1
        n, rng = self.counter, self.rng
        existing = sorted(vm["name"] for vm in vms)
        running = sorted(vm["name"] for vm in vms if vm["state"] == "running")
        stopped = sorted(vm["name"] for vm in vms if vm["state"] in ("stopped", "created", "error"))
        kernels, images = self.kernels(), self.images()
        ops: list[tuple[int, Callable[[], tuple[str, list[str], float]]]] = [
            (5, lambda: ("create", ["vm", "create", "--name", f"chaos{n}", "--no-start"], rng.uniform(0, 2.0))),
            (2, lambda: ("kernel import", self.kernel_import(n), rng.uniform(0, 1.5))),
            (1, lambda: ("image import", ["image", "import", f"chaosi{n}", str(self.rootfs)], rng.uniform(0, 3))),
        ]
        if existing:
            ops.append((3, lambda: ("rm", ["vm", "rm", "-f", rng.choice(existing)], rng.uniform(0, 1.0))))
        if kernels:
            ops.append((1, lambda: ("kernel rm", ["kernel", "rm", rng.choice(kernels)], rng.uniform(0, 0.5))))
        if images:
            ops.append((1, lambda: ("image rm", ["image", "rm", rng.choice(images)], rng.uniform(0, 0.5))))
        if stopped and self.starts < MAX_STARTS and not running:
            ops.append((3, lambda: self.start(rng.choice(stopped))))
        if running:
            vm = rng.choice(running)
            ops.append((2, lambda: ("cp in", ["vm", "cp", str(self.payload()), f"{vm}:/tmp/"], rng.uniform(0, 1.0))))
            ops.append((2, lambda: ("cp out", ["vm", "cp", f"{vm}:/usr/lib/os-release", str(self.scratch)], 0.3)))
            ops.append((1, lambda: ("stop", ["vm", "stop", vm, "--timeout", "20"], rng.uniform(0, 4.0))))
        weights = [w for w, _ in ops]
        return rng.choices([f for _, f in ops], weights)[0]()

    def start(self, name: str) -> tuple[str, list[str], float]:
        self.starts += 1
        return "start", ["vm", "start", name, "--timeout", "300"], self.rng.uniform(0, 10.0)

    def kernel_import(self, n: int) -> list[str]:
        return ["kernel", "import", str(self.kernel_dir), "--name", f"chaosk{n}", "--distro", "debian"]

    def payload(self) -> Path:
        path = self.scratch / "payload"
        if not path.exists():
            path.mkdir()
            for i in range(20):
                (path / f"f{i}").write_bytes(os.urandom(256 * 1024))
        return path

    def kill_daemon_during(self, args: list[str], delay: float) -> None:
        self.fe.cli("daemon", "start", check=True, timeout=120)
        pid = self.fe.env.daemon_pid()
        assert pid is not None
        op = self.fe.env.popen(*args)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: self.fe.env.daemon_pid() is None, timeout=30, what="the killed daemon's lock to go")
        try:
            op.communicate(timeout=60)  # it failed with the daemon, or finished before the kill
        except subprocess.TimeoutExpired:
            op.kill()
            op.communicate()


def test_daemon_sigkill_at_random_points_leaks_nothing(
    fault_env: FaultEnv,
    debian_kernel: Path,
    debian_rootfs_tar: Path,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("BANGER_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed {seed} (replay with BANGER_FAULT_SEED={seed})")
    fe = fault_env
    chaos = Chaos(fe, random.Random(seed), debian_kernel, debian_rootfs_tar, tmp_path)
    log: list[str] = []
    vms = fe.vms()
    try:
        for i in range(ITERATIONS):
            label, args, delay = chaos.pick(vms)
            log.append(f"{i}: {label} ({' '.join(args[1:3])}) killed after {delay:.2f}s")
            chaos.kill_daemon_during(args, delay)
            fe.cli("daemon", "start", check=True, timeout=120)
            try:
                vms = fe.check_consistent()
            except AssertionError as exc:
                daemon_log = fe.home / "logs" / "bangerd.log"
                tail = daemon_log.read_text(errors="replace").splitlines()[-60:] if daemon_log.exists() else []
                raise AssertionError(
                    f"seed {seed}, after:\n" + "\n".join(log) + f"\n{exc}\ndaemon log (last lines):\n" + "\n".join(tail)
                ) from exc
            leftovers = [p for p in tmp_path.rglob("*") if TEMP_NAME.search(p.name)]
            assert leftovers == [], f"seed {seed}: a killed cp left {leftovers}"
        # Everything still works after the storm: a VM boots and runs a command.
        fe.cli("vm", "create", "--name", "survivor", "--net", "none", "--vcpus", "1", "--memory", "256", check=True)
        assert fe.cli("vm", "exec", "survivor", "--", "echo", "ok", check=True).stdout == "ok\n"
    finally:
        print("\n".join(log))
        for vm in fe.vms():
            fe.cli("vm", "rm", "-f", vm["name"], timeout=120)
        for kernel in chaos.kernels():
            fe.cli("kernel", "rm", kernel, timeout=60)
        for image in chaos.images():
            fe.cli("image", "rm", image, timeout=60)
    fe.check_consistent()
    assert fe.taps() == set() and fe.leases() == {} and fe.vmm_pids() == set()
    assert sorted(p.name for p in (fe.home / "kernels").iterdir() if not p.name.startswith(".")) == [KERNEL]
