"""Detached VMM processes: identity by pid + start time, pidfd waits, kills that cannot hit a reused pid."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from banger.drivers import process
from banger.drivers.base import VmmHandle, VmmKind
from banger.errors import TimeoutError_, ToolError

pytestmark = pytest.mark.anyio


def spawn_sleep(tmp_path: Path, name: str = "sleep") -> VmmHandle:
    exe = tmp_path / name
    exe.symlink_to("/bin/sleep")
    pid = process.spawn([str(exe), "60"], log_file=tmp_path / "log" / "vmm.log")
    started = process.start_time(pid)
    assert started is not None
    sock = tmp_path / "ctl.sock"
    sock.write_text("")
    return VmmHandle(VmmKind.QEMU, pid, started, sock, tmp_path, (tmp_path / "other.sock",))


async def test_identity_survives_odd_process_names(tmp_path: Path) -> None:
    # comm may hold spaces and ')' — the stat parser must split after the last ')'.
    handle = spawn_sleep(tmp_path, "we) ird (name")
    try:
        assert process.matches(handle)
        ticks = os.sysconf("SC_CLK_TCK")
        boot_age = time.clock_gettime(time.CLOCK_BOOTTIME)
        assert abs(handle.start_time / ticks - boot_age) < 30  # started just now, in ticks since boot
        assert os.getsid(handle.pid) == handle.pid  # its own session: outlives the daemon's
        assert (tmp_path / "log" / "vmm.log").exists()
    finally:
        await process.kill(handle)
    assert not process.matches(handle)


async def test_wait_exit_times_out_then_sees_the_exit(tmp_path: Path) -> None:
    handle = spawn_sleep(tmp_path)
    began = time.monotonic()
    assert not await process.wait_exit(handle, 0.3)
    assert time.monotonic() - began >= 0.3
    os.kill(handle.pid, 15)
    assert await process.wait_exit(handle, 5)
    assert process.start_time(handle.pid) is None  # reaped, not left a zombie


async def test_kill_spares_a_process_whose_start_time_differs(tmp_path: Path) -> None:
    handle = spawn_sleep(tmp_path)
    impostor = dataclasses.replace(handle, start_time=handle.start_time - 1)  # as if the pid had been reused
    try:
        await process.kill(impostor)
        assert process.matches(handle), "kill hit a process that was not the recorded VMM"
    finally:
        await process.kill(handle)
    assert not process.matches(handle)


def test_remove_sockets(tmp_path: Path) -> None:
    handle = VmmHandle(VmmKind.FIRECRACKER, 1, 1, tmp_path / "a.sock", tmp_path, (tmp_path / "b.sock",))
    for path in (handle.control_socket, *handle.cleanup_paths):
        path.write_text("")
    process.remove_sockets(handle)
    process.remove_sockets(handle)  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_spawn_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="cannot start nope"):
        process.spawn([str(tmp_path / "nope")], log_file=tmp_path / "log")


async def test_deadline_names_what_it_waited_for() -> None:
    import asyncio

    with pytest.raises(TimeoutError_, match="the answer took longer than 0.05s"):
        async with process.deadline(0.05, "the answer"):
            await asyncio.sleep(5)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


THREADED = "import threading, time\nfor _ in range(8): threading.Thread(target=time.sleep, args=(60,)).start()\n"


async def test_kill_reaps_a_multithreaded_child_every_time(tmp_path: Path) -> None:
    """`vm rm -f`: the killed VMM must not stay a zombie child of the daemon. A VMM has many threads, and its
    pidfd turns readable a moment before waitpid can collect it: a single look left zombies before the fix."""
    for i in range(15):
        pid = process.spawn([sys.executable, "-c", THREADED], log_file=tmp_path / "vmm.log")
        while len(os.listdir(f"/proc/{pid}/task")) < 9:
            await asyncio.sleep(0.01)
        started = process.start_time(pid)
        assert started is not None
        await process.kill(VmmHandle(VmmKind.QEMU, pid, started, tmp_path / "none", tmp_path))
        assert not _is_zombie(pid), f"round {i}: pid {pid} left as a zombie"


async def test_a_child_that_died_on_its_own_is_reaped_when_looked_at(tmp_path: Path) -> None:
    handle = spawn_sleep(tmp_path)
    os.kill(handle.pid, 9)
    while not _is_zombie(handle.pid):
        time.sleep(0.01)
    assert not process.matches(handle)
    assert not _is_zombie(handle.pid)


async def test_tagged_pids_finds_exactly_the_vmms_spawned_for_a_run_dir(tmp_path: Path) -> None:
    """The orphan finder: a VMM spawned for a run dir (Firecracker's argv names no disk at all) is found; a
    process that only names the VM's files (an admin's `tail -f` of the root disk) is not."""
    run_dir, other = tmp_path / "run" / "vm1", tmp_path / "run" / "vm2"
    disk = tmp_path / "root.ext4"
    disk.write_bytes(b"")
    exe = tmp_path / "firecracker"
    exe.symlink_to("/bin/sleep")
    pids = [process.spawn([str(exe), "60"], log_file=d / "vmm.log") for d in (run_dir, other)]
    bystander = subprocess.Popen(["tail", "-f", str(disk), str(run_dir / "vmm.log")])
    try:
        assert process.tagged_pids(run_dir) == [pids[0]]
        assert process.tagged_pids(other) == [pids[1]]
    finally:
        bystander.kill()
        bystander.wait()
        for pid in pids:
            started = process.start_time(pid)
            assert started is not None
            await process.kill(VmmHandle(VmmKind.FIRECRACKER, pid, started, tmp_path / "x", tmp_path))
