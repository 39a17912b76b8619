"""Requests beyond what the host has are refused up front, and the refusal names the limit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from banger.errors import InvalidInputError
from banger.vms.limits import check_request, host_cpus, host_memory_mib

GIB = 1 << 30


def test_within_limits_passes(tmp_path: Path) -> None:
    check_request(vcpus=1, memory_mib=256, disk_bytes=GIB // 4, vm_root=tmp_path / "vms")


def test_more_memory_than_the_host_has(tmp_path: Path) -> None:
    total = host_memory_mib()
    with pytest.raises(InvalidInputError, match=rf"more than this host has \({total} MiB\)"):
        check_request(vcpus=1, memory_mib=total + 1, disk_bytes=0, vm_root=tmp_path)
    with pytest.raises(InvalidInputError, match="at least 128 MiB"):
        check_request(vcpus=1, memory_mib=64, disk_bytes=0, vm_root=tmp_path)


def test_more_vcpus_than_the_host_has(tmp_path: Path) -> None:
    cpus = host_cpus()
    with pytest.raises(InvalidInputError, match=rf"between 1 and {min(cpus, 64)}, the CPUs this host has"):
        check_request(vcpus=cpus + 1, memory_mib=256, disk_bytes=0, vm_root=tmp_path)
    with pytest.raises(InvalidInputError):
        check_request(vcpus=0, memory_mib=256, disk_bytes=0, vm_root=tmp_path)


def test_a_disk_larger_than_the_free_space(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(InvalidInputError, match=f"free space under {tmp_path / 'not' / 'yet'}"):
        check_request(vcpus=1, memory_mib=256, disk_bytes=free + 64 * GIB, vm_root=tmp_path / "not" / "yet")
