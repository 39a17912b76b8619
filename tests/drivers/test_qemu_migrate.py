"""QEMU snapshot helpers that need no guest: memory options, and copying guest RAM out of a real memfd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from banger.drivers import qemu_migrate
from banger.drivers.base import RestoreFrom, VmSpec
from banger.errors import ToolError


def spec(tmp_path: Path, restore: RestoreFrom | None = None) -> VmSpec:
    return VmSpec(
        name="t",
        vcpus=1,
        memory_mib=256,
        kernel=tmp_path / "vmlinux",
        cmdline="console=ttyS0",
        console_log=tmp_path / "console.log",
        run_dir=tmp_path,
        restore=restore,
    )


def test_booted_guests_get_shared_memfd_ram_and_restores_map_the_image_privately(tmp_path: Path) -> None:
    booted = qemu_migrate.memory_args(spec(tmp_path))
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in booted
    assert "-incoming" not in booted
    image = tmp_path / "snap,1" / "memory.ram"
    restored = qemu_migrate.memory_args(spec(tmp_path, RestoreFrom(tmp_path / "state", image)))
    backend = restored[restored.index("-object") + 1]
    assert "memory-backend-file" in backend and "share=off" in backend
    assert "mem-path=" + str(image).replace(",", ",,") in backend  # a comma in a path is escaped
    assert restored[-3:] == ["-S", "-incoming", "defer"]


def test_copy_extents_keeps_holes_and_data(tmp_path: Path) -> None:
    size = 64 << 20
    fd = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, b"A" * 8192, 0)
        os.pwrite(fd, b"B" * 4096, 40 << 20)
        out_path = tmp_path / "ram"
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(out, size)
            copied = qemu_migrate._copy_extents(fd, out, size)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    assert copied == 8192 + 4096
    data = out_path.read_bytes()
    assert len(data) == size
    assert data[:8192] == b"A" * 8192 and data[40 << 20 : (40 << 20) + 4096] == b"B" * 4096
    assert data.count(0) == size - copied
    assert out_path.stat().st_blocks * 512 < 1 << 20  # holes stayed holes


def test_a_process_without_guest_ram_memfd_is_a_clear_error() -> None:
    with pytest.raises(ToolError, match="no guest-RAM memfd"):
        qemu_migrate.find_memory_fd(os.getpid())


def test_a_resumed_clone_without_memfd_gets_a_sparse_image_its_stream_fills(tmp_path: Path) -> None:
    dest = tmp_path / "memory.ram"
    assert qemu_migrate.copy_guest_memory(os.getpid(), dest, 32 << 20, private_ok=True) == 0
    assert dest.stat().st_size == 32 << 20 and dest.stat().st_blocks == 0
