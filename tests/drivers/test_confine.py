"""Confinement pieces without a VM: cgroup layouts (v1 and v2, on fabricated trees), limits, command lines."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from banger.drivers import cgroups, confine, process


def _v1(root: Path) -> None:
    for name in ("memory", "pids", "cpu,cpuacct", "hugetlb"):
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")


def test_layout_v1_and_v2_and_none(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    _v1(v1)
    version, found = cgroups.layout(v1)
    assert version is cgroups.Version.V1 and found["cpu"].name == "cpu,cpuacct"
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    assert cgroups.layout(v2)[0] is cgroups.Version.V2
    # This host's kind of v2 mount: only hugetlb on offer, so it is of no use for limits.
    poor = tmp_path / "poor"
    poor.mkdir()
    (poor / "cgroup.controllers").write_text("hugetlb\n")
    assert cgroups.layout(poor) == (cgroups.Version.NONE, {})
    assert cgroups.missing(poor) == ["memory", "pids", "cpu"]


def test_create_writes_limits_on_v1_and_v2(tmp_path: Path) -> None:
    limits = cgroups.Limits.for_vm(2, 512)
    assert limits.memory_bytes == (512 + cgroups.MEMORY_OVERHEAD_MIB) << 20
    assert limits.cpu_quota_us == 2 * cgroups.CPU_PERIOD_US
    v1 = tmp_path / "v1"
    _v1(v1)
    dirs = cgroups.create("vm-1", limits, v1)
    assert len(dirs) == 3
    assert (v1 / "memory/banger/vm-1/memory.limit_in_bytes").read_text() == str(limits.memory_bytes)
    assert (v1 / "pids/banger/vm-1/pids.max").read_text() == str(limits.pids)
    assert (v1 / "cpu,cpuacct/banger/vm-1/cpu.cfs_quota_us").read_text() == str(limits.cpu_quota_us)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory pids")
    [group] = cgroups.create("vm-2", limits, v2)
    assert (group / "memory.max").read_text() == str(limits.memory_bytes)
    assert (group / "cpu.max").read_text() == f"{limits.cpu_quota_us} {cgroups.CPU_PERIOD_US}"
    assert (v2 / "banger" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"


def test_command_line_swaps_paths_for_descriptors() -> None:
    swaps = {"/s/vms/a/root.ext4": "/dev/fd/7", "/s/vms/a/console.log": "/dev/fd/8"}
    assert confine._swap("id=disk0,file=/s/vms/a/root.ext4,format=raw", swaps) == "id=disk0,file=/dev/fd/7,format=raw"
    assert confine._swap("file,id=console,path=/s/vms/a/console.log", swaps) == "file,id=console,path=/dev/fd/8"
    assert confine._swap("/s/vms/a/root.ext4", swaps) == "/dev/fd/7"
    assert confine._swap("/s/vms/a/root.ext4.bak", swaps) == "/s/vms/a/root.ext4.bak"
    assert confine._uses_kvm(["qemu", "-accel", "kvm"]) and not confine._uses_kvm(["qemu", "-accel", "tcg,tb-size=128"])


def _real_cgroups() -> None:
    if os.geteuid() != 0 or cgroups.layout()[0] is cgroups.Version.NONE:
        pytest.skip("needs root and a cgroup hierarchy with memory, pids and cpu")


def _remove(groups: list[Path]) -> None:
    for group in groups:
        with contextlib.suppress(OSError):
            os.rmdir(group)


def test_collect_spares_young_and_busy_groups_and_removes_old_empty_ones() -> None:
    """Regression (found by the chaos suite): a restarted daemon's collect removed the group of a VMM still in its
    exec chain, which then failed to join it and died while `vm ls` called it running."""
    _real_cgroups()
    tag = f"test-{os.getpid()}-{secrets.token_hex(3)}"
    limits = cgroups.Limits.for_vm(1, 128)
    young, old, busy = (cgroups.create(f"{tag}-{kind}", limits) for kind in ("young", "old", "busy"))
    child = subprocess.Popen(["sleep", "120"])
    try:
        cgroups.join(busy, child.pid)
        an_hour_ago = time.time() - 3600
        for group in old + busy:
            os.utime(group, (an_hour_ago, an_hour_ago))
        cgroups.collect()
        assert all(group.is_dir() for group in young + busy)
        assert not any(group.exists() for group in old)
        assert cgroups.in_use(f"{tag}-busy") and not cgroups.in_use(f"{tag}-young")
    finally:
        child.kill()
        child.wait(timeout=10)
        _remove(young + old + busy)


def test_free_uid_skips_uids_of_vmms_that_have_not_dropped_to_them_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VMM spawned a moment ago still runs as root in its exec chain: neither its uid (handed out by this daemon)
    nor its cgroup's uid (handed out by a daemon since killed) may go to another VM meanwhile."""
    _real_cgroups()
    first = confine.free_uid()
    child = subprocess.Popen(["sleep", "120"])  # stands in for the VMM's exec chain, still root
    groups: list[Path] = []
    try:
        monkeypatch.setitem(confine._handed_out, first, (child.pid, process.start_time(child.pid)))
        assert confine.free_uid() != first
        monkeypatch.delitem(confine._handed_out, first)
        assert confine.free_uid() == first
        groups = cgroups.create(f"vm-{first}", cgroups.Limits.for_vm(1, 128))
        cgroups.join(groups, child.pid)
        assert confine.free_uid() != first
    finally:
        child.kill()
        child.wait(timeout=10)
        _remove(groups)
    assert confine.free_uid() == first
