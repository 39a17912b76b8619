"""Per-VM cgroups with memory, pids and CPU limits, on cgroup v1 (one hierarchy per controller) or v2 (unified).

Each VMM gets `banger/<name>` under every controller banger uses; the VMM joins them before it execs (see
confine_exec.py), and the daemon moves it in as well right after the spawn (`join`), so a group is never empty
once the spawn lock is released. Empty groups of VMMs that are gone are removed at the next spawn and at daemon
start (`collect`), but never a group made in the last GRACE_S seconds: that one may belong to a VMM still starting
under a daemon that was killed before it could `join`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

log = logging.getLogger("banger.drivers.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "banger"
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
# A group younger than this is never collected (see the module docstring).
GRACE_S = 120.0
# What a VMM needs beyond guest RAM: TCG's translation cache (128 MiB), device emulation, QEMU itself.
MEMORY_OVERHEAD_MIB = 384


class Version(StrEnum):
    """Which cgroup hierarchy this host offers for banger's controllers."""

    V1 = "v1"
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True)
class Limits:
    """What one VMM may use, derived from its VM's size."""

    memory_bytes: int
    pids: int
    cpu_quota_us: int
    cpu_period_us: int = CPU_PERIOD_US

    @classmethod
    def for_vm(cls, vcpus: int, memory_mib: int) -> Limits:
        """Guest RAM plus overhead; vCPU threads plus QEMU's own; vcpus CPUs' worth of time."""
        return cls((memory_mib + MEMORY_OVERHEAD_MIB) << 20, 64 + 8 * vcpus, vcpus * CPU_PERIOD_US)


def layout(root: Path = CGROUP_ROOT) -> tuple[Version, dict[str, Path]]:
    """The hierarchy to use and, per controller, the directory banger's groups go under."""
    v2_controllers = (root / "cgroup.controllers").read_text().split() if (root / "cgroup.controllers").exists() else []
    if all(c in v2_controllers for c in CONTROLLERS):
        return Version.V2, {c: root for c in CONTROLLERS}
    found: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            for controller in CONTROLLERS:
                if controller in entry.name.split(",") and (entry / "cgroup.procs").exists():
                    found.setdefault(controller, entry)
    if len(found) == len(CONTROLLERS):
        return Version.V1, found
    return Version.NONE, {}


def missing(root: Path = CGROUP_ROOT) -> list[str]:
    """Controllers this host lacks (empty when per-VM limits work)."""
    version, found = layout(root)
    return [] if version is not Version.NONE else [c for c in CONTROLLERS if c not in found]


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def create(name: str, limits: Limits, root: Path = CGROUP_ROOT) -> list[Path]:
    """Make the VMM's groups with their limits; returns the directories to join (empty: no cgroups here)."""
    version, found = layout(root)
    if version is Version.NONE:
        return []
    if version is Version.V2:
        parent = root / PARENT
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        group = parent / name
        group.mkdir(exist_ok=True)
        _write(group / "memory.max", str(limits.memory_bytes))
        if (group / "memory.swap.max").exists():
            _write(group / "memory.swap.max", "0")
        _write(group / "pids.max", str(limits.pids))
        _write(group / "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")
        return [group]
    groups = []
    for controller, base in found.items():
        group = base / PARENT / name
        group.mkdir(parents=True, exist_ok=True)
        groups.append(group)
        if controller == "memory":
            _write(group / "memory.limit_in_bytes", str(limits.memory_bytes))
        elif controller == "pids":
            _write(group / "pids.max", str(limits.pids))
        elif controller == "cpu":
            _write(group / "cpu.cfs_period_us", str(limits.cpu_period_us))
            _write(group / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
    return groups


def join(groups: list[Path], pid: int) -> None:
    """Move process `pid` (all its threads) into `groups`; nothing if it has exited already."""
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            _write(group / "cgroup.procs", str(pid))


def in_use(name: str, root: Path = CGROUP_ROOT) -> bool:
    """Whether banger's group `name` exists with a process in it, under any controller."""
    _version, found = layout(root)
    for base in set(found.values()):
        with contextlib.suppress(OSError):
            if (base / PARENT / name / "cgroup.procs").read_text().strip():
                return True
    return False


def pids_in(name: str, root: Path = CGROUP_ROOT) -> set[int]:
    """The processes in banger's group `name` (under any controller)."""
    _version, found = layout(root)
    pids: set[int] = set()
    for base in set(found.values()):
        with contextlib.suppress(OSError, ValueError):
            pids |= {int(x) for x in (base / PARENT / name / "cgroup.procs").read_text().split()}
    return pids


def collect(root: Path = CGROUP_ROOT, grace: float = GRACE_S) -> None:
    """Remove banger's groups that no process is in any more (and that are older than `grace` seconds)."""
    _version, found = layout(root)
    now = time.time()
    for base in set(found.values()):
        parent = base / PARENT
        if not parent.is_dir():
            continue
        for group in parent.iterdir():
            with contextlib.suppress(OSError):
                if not group.is_dir() or now - group.stat().st_mtime < grace:
                    continue
                if not (group / "cgroup.procs").read_text().strip():
                    os.rmdir(group)


def of_pid(pid: int) -> list[str]:
    """The cgroup paths a process is in (lines of /proc/PID/cgroup)."""
    return Path(f"/proc/{pid}/cgroup").read_text().splitlines()
