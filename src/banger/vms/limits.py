"""What this host can give one VM: checked before anything is created, with the limit in the refusal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from banger.errors import InvalidInputError

MIB = 1 << 20
MAX_VCPUS = 64
MIN_MEMORY_MIB = 128


def host_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's total memory in MiB (MemTotal)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise InvalidInputError(f"{meminfo} has no MemTotal line")


def host_cpus() -> int:
    """CPUs this process may run on (what a VMM's vCPU threads can use)."""
    return len(os.sched_getaffinity(0))


def free_bytes(where: Path) -> int:
    """Free space on the filesystem that holds `where` (or its nearest existing parent)."""
    path = where
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n // MIB} MiB"


def check_request(*, vcpus: int, memory_mib: int, disk_bytes: int, vm_root: Path) -> None:
    """Refuse vCPUs, memory or a disk this host cannot provide (InvalidInputError naming the limit)."""
    cpus = min(host_cpus(), MAX_VCPUS)
    if vcpus < 1 or vcpus > cpus:
        raise InvalidInputError(f"vcpus must be between 1 and {cpus}, the CPUs this host has (got {vcpus})")
    if memory_mib < MIN_MEMORY_MIB:
        raise InvalidInputError(f"memory must be at least {MIN_MEMORY_MIB} MiB (got {memory_mib})")
    total = host_memory_mib()
    if memory_mib > total:
        raise InvalidInputError(f"memory {memory_mib} MiB is more than this host has ({total} MiB)")
    free = free_bytes(vm_root)
    if disk_bytes > free:
        raise InvalidInputError(
            f"disk size {_size(disk_bytes)} is more than the free space under {vm_root} ({_size(free)})"
        )
