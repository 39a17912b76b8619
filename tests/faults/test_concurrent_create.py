"""Twenty `vm create` calls at once (issue 9, item 14): each succeeds or fails cleanly, nothing is shared."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from banger.net.links import guest_mac

from .conftest import FaultEnv

pytestmark = [pytest.mark.vm, pytest.mark.faults]

CREATES = 20
STARTED = 3  # real boots; the rest --no-start, to keep a 2-core machine sane


def test_twenty_concurrent_creates_get_unique_names_addresses_macs_and_disks(fault_env: FaultEnv) -> None:
    fe = fault_env

    def create(i: int) -> tuple[int, str, str]:
        args = ["vm", "create", "--vcpus", "1", "--memory", "256", "--json"]
        args += ["--name", f"conc{i}"] if i % 2 else []  # half get generated names, which must not collide
        args += [] if i < STARTED else ["--no-start"]
        r = fe.cli(*args, timeout=900)
        return r.returncode, r.stdout, r.stderr

    with ThreadPoolExecutor(CREATES) as pool:
        results = list(pool.map(create, range(CREATES)))
    try:
        created = []
        for code, out, err in results:
            if code == 0:
                created.append(json.loads(out))
            else:  # failing is allowed, but as one clear line, and without leftovers (checked below)
                assert err.startswith("error: ") and "Traceback" not in err, err
        assert len(created) >= CREATES - 2, [r[2] for r in results if r[0]]
        listed = {vm["id"]: vm for vm in fe.vms()}
        assert set(listed) == {vm["id"] for vm in created}  # a failed create left no record
        names = [vm["name"] for vm in listed.values()]
        ips = [vm["ip"] for vm in listed.values()]
        macs = [guest_mac(vm_id) for vm_id in listed]
        assert len(set(names)) == len(names) and len(set(ips)) == len(ips) and None not in ips
        assert len(set(macs)) == len(macs)
        disks = [Path(fe.info(vm["name"])["dir"]) / "root.ext4" for vm in listed.values()]
        inodes = {(os.stat(d).st_dev, os.stat(d).st_ino) for d in disks}
        assert len(inodes) == len(disks)  # one disk file each, not a shared one
        assert sum(vm["state"] == "running" for vm in listed.values()) == sum(
            1 for i, (code, _, _) in enumerate(results) if i < STARTED and code == 0
        )
        fe.check_consistent()
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda vm: fe.cli("vm", "rm", "-f", vm["id"], timeout=300), fe.vms()))
    assert fe.vms() == []
