"""A real boot: the Debian image + a seed from build_seed under QEMU microvm (TCG), driven through virtio-serial.

This is the one place the agent runs on the real transport: QEMU's chardev socket on the host, a virtserialport
named org.banger.agent in the guest, banger-init as PID 1 configuring the network from meta.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.guest.client import AgentClient, AgentError
from banger.guest.init import READY_MARKER
from banger.guest.seed import HaltAction, NetInterface, Network, SeedMeta, build_seed
from tests.images import conftest as images_conftest
from tests.images.conftest import debian_image  # noqa: F401 - the fixture, shared with tests/images
from tests.kernels.conftest import build_cached_kernel, host_tsc_khz

MAC = "02:42:0a:00:02:0f"
# Held while copying so another session cannot prune the cached image under us (private to tests/images).
image_cache_lock = getattr(images_conftest, "_cache_lock", contextlib.nullcontext)
BOOT_TIMEOUT = 300.0


@dataclass
class BootedVm:
    proc: subprocess.Popen[bytes]
    agent_socket: Path
    console: Path
    halt: HaltAction


@pytest.fixture(params=[HaltAction.POWEROFF, HaltAction.REBOOT], ids=lambda h: f"halt-{h}")
def booted_vm(request: pytest.FixtureRequest, debian_image: Path, tmp_path: Path) -> Iterator[BootedVm]:  # noqa: F811
    """QEMU running the image with a real seed; killed (and its console printed) at teardown."""
    kernel = build_cached_kernel().dir
    root = tmp_path / "root.ext4"
    with image_cache_lock():  # other sessions prune images built by older code; not while we copy ours
        if not debian_image.is_file():
            pytest.fail(f"{debian_image} was pruned by another test session (images code changed); rerun")
        subprocess.run(["cp", "--sparse=always", str(debian_image), str(root)], check=True)
    seed = tmp_path / "seed.ext4"
    # QEMU's user-mode network: guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3 (no host network is touched).
    net = Network((NetInterface("eth0", MAC, "10.0.2.15", 24, "10.0.2.2", 1500),), ("10.0.2.3",), ("banger.test",))
    halt: HaltAction = request.param
    build_seed(seed, SeedMeta(hostname="agent-vm", vm_name="agent-vm", network=net, halt=halt))
    sock, console = tmp_path / "agent.sock", tmp_path / "console.log"
    cmdline = (kernel / "cmdline").read_text().strip()
    argv = [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", f"file:{console}", "-monitor", "none",
        "-kernel", str(kernel / "vmlinux"), "-initrd", str(kernel / "initrd.img"),
        "-append", f"{cmdline} tsc_early_khz={host_tsc_khz()} init=/sbin/banger-init",
        "-device", "virtio-rng-device",
        "-drive", f"id=root,file={root},format=raw,if=none", "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=seed,file={seed},format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=seed",
        "-netdev", "user,id=n0", "-device", f"virtio-net-device,netdev=n0,mac={MAC}",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtio-serial-device", "-device", "virtserialport,chardev=agent,name=org.banger.agent",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield BootedVm(proc, sock, console, halt)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        print("--- guest console ---\n" + (console.read_text(errors="replace") if console.exists() else "(none)"))


async def _connect(vm: BootedVm) -> AgentClient:
    deadline = time.monotonic() + 30
    while not vm.agent_socket.exists():  # QEMU creates the chardev socket while it starts up
        if vm.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"QEMU did not start: {vm.proc.stderr.read() if vm.proc.stderr else b''!r}")
        await asyncio.sleep(0.05)
    return await AgentClient.connect_unix(vm.agent_socket, timeout=BOOT_TIMEOUT)


async def _exercise(vm: BootedVm, tmp_path: Path) -> None:
    started = time.monotonic()
    client = await _connect(vm)
    health = await client.health(timeout=60)
    print(f"agent answered {time.monotonic() - started:.1f}s after launch; guest uptime {health.uptime:.1f}s")
    assert health.hostname == "agent-vm"
    resolv = await client.run(["cat", "/etc/resolv.conf"])
    assert "nameserver 10.0.2.3" in resolv.stdout.decode() and "search banger.test" in resolv.stdout.decode()
    addr = await client.run(["ip", "-4", "-o", "address", "show", "dev", "eth0"])
    assert "10.0.2.15/24" in addr.stdout.decode(), addr
    route = await client.run(["ip", "route", "show", "default"])
    assert "default via 10.0.2.2 dev eth0" in route.stdout.decode()
    tty = await client.run(["tty"], tty=True)
    assert tty.stdout.startswith(b"/dev/pts/") and tty.status.ok
    # Several MB through a port that accepts 32 KiB per write, both ways.
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 * 1024 * 1024))
    blob.chmod(0o751)
    await client.put(blob, "/root/blob")
    sums = await client.run(["sha256sum", "/root/blob"])
    assert sums.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()).hexdigest()
    back = await client.get("/root/blob", tmp_path / "back")
    assert back.read_bytes() == blob.read_bytes() and (back.stat().st_mode & 0o777) == 0o751
    server = await client.start_exec(["python3", "-m", "http.server", "8123", "--bind", "127.0.0.1"])
    for _ in range(100):
        found = [p for p in await client.ports() if p.port == 8123]
        if found:
            break
        await asyncio.sleep(0.2)
    assert found and found[0].comm == "python3" and found[0].address == "127.0.0.1"
    await server.cancel()
    # virtio-serial reads EOF while no host is connected: the agent must wait, then serve a new session.
    await client.close()
    client = await _connect(vm)
    assert (await client.run(["echo", "back"])).stdout == b"back\n"
    # An agent killed under a connected host: init restarts it, and its announcement ends the host's session.
    old_pid = (await client.health()).pid
    with pytest.raises(AgentError, match="connection closed"):
        await client.run(["kill", "-9", str(old_pid)], timeout=60)
    assert not client.connected
    await client.close()
    client = await _connect(vm)
    assert (await client.health()).pid != old_pid
    await client.poweroff()
    await client.close()


@pytest.mark.vm
def test_boot_reaches_agent_and_powers_off(booted_vm: BootedVm, tmp_path: Path) -> None:
    asyncio.run(_exercise(booted_vm, tmp_path))
    assert booted_vm.proc.wait(timeout=120) == 0
    console = booted_vm.console.read_text(errors="replace")
    assert READY_MARKER in console
    # Either way QEMU exits (it runs with -no-reboot, as banger's QEMU driver does; Firecracker exits on reboot).
    last = "powering off" if booted_vm.halt is HaltAction.POWEROFF else "rebooting to end the VM"
    assert f"banger-init: {last}" in console
    assert "agent exited (killed by SIGKILL); restarting" in console
    assert "Kernel panic" not in console
