"""Confined VMMs: a running QEMU's /proc status (own uid, seccomp filter, no new privileges, no capabilities),
its cgroup limits derived from the VM's size, its files private to its uid; and `banger doctor` saying so."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.drivers import cgroups, confine
from tests.conftest import BangerEnv

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def two_vms(vm_home: BangerEnv) -> Iterator[BangerEnv]:
    """Two root-owned VMs of different sizes in the package's shared state root."""
    for name, vcpus, mem in (("c1", "1", "384"), ("c2", "2", "512")):
        argv = ("vm", "create", "--name", name, "--net", "none", "--vcpus", vcpus, "--memory", mem)
        r = vm_home.cli(*argv, timeout=600)
        assert r.returncode == 0, r.stderr
    yield vm_home
    for name in ("c1", "c2"):
        vm_home.cli("vm", "rm", "-f", name, timeout=120)
    cgroups.collect()  # the stopped VMMs' empty groups (the daemon collects them at its next spawn)


def _pid(benv: BangerEnv, name: str) -> int:
    return int(json.loads(benv.cli("vm", "show", name, "--json", check=True).stdout)["pid"])


def _cgroup_dir(pid: int, controller: str) -> Path:
    version, found = cgroups.layout()
    for line in cgroups.of_pid(pid):
        _, names, path = line.split(":", 2)
        if version is cgroups.Version.V2 and names == "":
            return Path("/sys/fs/cgroup") / path.lstrip("/")
        if controller in names.split(","):
            return found[controller] / path.lstrip("/")
    raise AssertionError(f"pid {pid} is in no {controller} cgroup")


def test_vmm_runs_confined(two_vms: BangerEnv) -> None:
    pids = {name: _pid(two_vms, name) for name in ("c1", "c2")}
    uids = set()
    for pid in pids.values():
        status = confine.status_of(pid)
        uid = int(status["Uid"])
        assert confine.VMM_UID_BASE < uid <= confine.VMM_UID_BASE + confine.VMM_UID_COUNT, status
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0, status
        uids.add(uid)
    assert len(uids) == 2, "each VMM has a uid of its own"


def test_vm_files_are_private_to_the_vmm_uid(two_vms: BangerEnv) -> None:
    pid = _pid(two_vms, "c1")
    uid = int(confine.status_of(pid)["Uid"])
    vm_dir = Path(json.loads(two_vms.cli("vm", "show", "c1", "--json", check=True).stdout)["dir"])
    owned = [p for p in vm_dir.rglob("*") if p.is_file() and p.stat().st_uid == uid]
    assert any(p.name == "console.log" for p in owned)
    for p in owned:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
    assert stat.S_IMODE(two_vms.home.stat().st_mode) & 0o007 in (0, 1)  # others can at most traverse


@pytest.mark.skipif(cgroups.layout()[0] is cgroups.Version.NONE, reason="this host has no usable cgroups")
def test_cgroup_limits_follow_the_vm_size(two_vms: BangerEnv) -> None:
    for name, vcpus, mem in (("c1", 1, 384), ("c2", 2, 512)):
        pid = _pid(two_vms, name)
        want = cgroups.Limits.for_vm(vcpus, mem)
        version, _ = cgroups.layout()
        if version is cgroups.Version.V1:
            assert int((_cgroup_dir(pid, "memory") / "memory.limit_in_bytes").read_text()) == want.memory_bytes
            assert int((_cgroup_dir(pid, "pids") / "pids.max").read_text()) == want.pids
            assert int((_cgroup_dir(pid, "cpu") / "cpu.cfs_quota_us").read_text()) == want.cpu_quota_us
        else:
            group = _cgroup_dir(pid, "memory")
            assert int((group / "memory.max").read_text()) == want.memory_bytes
            assert (group / "cpu.max").read_text().split()[0] == str(want.cpu_quota_us)


def test_doctor_reports_confinement(two_vms: BangerEnv) -> None:
    rep = json.loads(two_vms.cli("doctor", "--json", check=True).stdout)["confinement"]
    assert rep["qemu"]["enabled"] is True and "elevateprivileges=deny" in rep["qemu"]["seccomp_sandbox"]
    assert rep["cgroups"]["version"] in ("v1", "v2")
    # Firecracker under its jailer: the jailer is found beside the binary, and the report says it is in force.
    assert rep["firecracker_jailed"] is True and rep["firecracker_jailer"].endswith("/jailer")
    assert not any("jailer" in m for m in rep["missing"])
    text = two_vms.cli("doctor", check=True).stdout
    assert "confinement" in text and "seccomp" in text
