"""Fault injection on real guests: a daemon inside a network namespace the test creates, and leak checks.

Every check looks at the real thing: the namespace's links and nft ruleset, the SQLite store, /proc for VMM and
console-writer processes, and the files under the state root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from banger.net.links import TAP_PREFIX, tap_name
from tests.conftest import BangerEnv
from tests.images.conftest import debian_image, debian_rootfs_tar  # noqa: F401  (fixtures re-exported)
from tests.kernels.conftest import debian_kernel  # noqa: F401
from tests.vms.conftest import installed_home

CONSOLE_CAP_MIB = 1
# Names banger gives its temporary files and directories (fsutil, kernels, images, seed, transfer).
TEMP_NAME = re.compile(r"^\..*\.tmp$|\.banger-|^\.download\.|^\.unpack\.|\.tmp$")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30).stdout


@contextlib.contextmanager
def test_netns() -> Iterator[str]:
    """A throwaway network namespace (loopback up), always deleted."""
    name = f"banger-test-f{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@dataclass
class FaultEnv:
    """A state root whose daemon runs in namespace `ns`, with probes of everything it may leak."""

    env: BangerEnv
    ns: str

    @property
    def home(self) -> Path:
        return self.env.home

    def cli(self, *args: str, **kw: Any) -> Any:
        return self.env.cli(*args, **kw)

    def vms(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(self.cli("vm", "ls", "--json", check=True, timeout=120).stdout)
        return out

    def info(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.cli("vm", "show", name, "--json", check=True).stdout)
        return out

    def processes(self, marker: str) -> list[int]:
        """Live processes (zombies excluded) whose argv mentions this state root and `marker`."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            argv = _cmdline(int(entry.name))
            if argv and any(str(self.home) in a for a in argv) and any(marker in a for a in argv):
                if _state(int(entry.name)) not in ("Z", "X"):
                    pids.append(int(entry.name))
        return pids

    def vmm_pids(self) -> set[int]:
        return {p for p in self.processes("qemu") if "qemu" in Path(_cmdline(p)[0]).name}

    def taps(self) -> set[str]:
        links = json.loads(ip("-j", "-n", self.ns, "link", "show"))
        return {link["ifname"] for link in links if link["ifname"].startswith(TAP_PREFIX)}

    def ruleset(self) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, "nft", "list", "ruleset"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows read straight from the store (read-only; cheaper than a CLI round trip per check)."""
        db = sqlite3.connect(f"file:{self.home / 'banger.db'}?mode=ro", uri=True, timeout=30)
        try:
            return list(db.execute(sql))
        finally:
            db.close()

    def leases(self) -> dict[str, str]:
        """vm_id -> ip."""
        return {vm_id: addr for addr, vm_id in self._query("SELECT ip, vm_id FROM ip_leases")}

    def kernel_names(self) -> set[str]:
        return {name for (name,) in self._query("SELECT name FROM kernels")}

    def image_names(self) -> set[str]:
        return {name for (name,) in self._query("SELECT name FROM images")}

    def temp_leftovers(self) -> list[Path]:
        found = []
        for root, dirs, files in os.walk(self.home):  # symlinks (the shared image cache) are not followed
            for name in (*dirs, *files):
                if TEMP_NAME.search(name):
                    found.append(Path(root) / name)
        return found

    def check_consistent(self) -> list[dict[str, Any]]:
        """`vm ls` matches what runs, and nothing of a VM outlives it; returns the listing."""
        vms = self.vms()
        running = {vm["id"]: vm for vm in vms if vm["state"] == "running"}
        assert not [vm for vm in vms if vm["state"] in ("starting", "stopping")], f"VMs left in transition: {vms}"
        assert self.vmm_pids() == {vm["pid"] for vm in running.values()}, f"VMMs {self.vmm_pids()} vs {vms}"
        bridged = {vm_id for vm_id, vm in running.items() if vm["net"] == "bridge"}
        assert self.taps() == {tap_name(vm_id) for vm_id in bridged}
        rules = self.ruleset()
        ids = {vm["id"] for vm in vms}
        leases = self.leases()
        assert set(leases) <= ids, f"leases of VMs that do not exist: {set(leases) - ids}"
        for vm_id, addr in leases.items():
            if vm_id not in bridged:
                assert tap_name(vm_id) not in rules and f"{addr} " not in rules, f"nft rules of stopped VM {vm_id}"
        vm_dirs = {p.name for p in (self.home / "vms").iterdir()} if (self.home / "vms").exists() else set()
        assert vm_dirs == ids, f"VM directories {vm_dirs} vs VMs {ids}"
        run = self.home / "run"
        for sock in run.glob("*/*"):
            if sock.is_socket():
                assert sock.parent.name in running, f"socket of a VM that is not running: {sock}"
        assert self.temp_leftovers() == []
        kernels = self.kernel_names()
        kernel_dirs = {p.name for p in (self.home / "kernels").iterdir() if not p.name.startswith(".")}
        assert kernels == kernel_dirs, f"kernels {kernels} vs directories {kernel_dirs}"
        images = self.image_names()
        image_files = {p.stem for p in (self.home / "images").iterdir() if not p.name.startswith(".")}
        assert images == image_files, f"images {images} vs files {image_files}"
        writers = self.processes("banger.drivers.consolelog")
        assert len(writers) <= len(running), f"console writers {writers} outlive their VMMs"
        return vms


@pytest.fixture(scope="session")
def fault_env(debian_kernel: Path, debian_image: Path) -> Iterator[FaultEnv]:  # noqa: F811
    """A daemon in its own network namespace, kernel and image installed, console logs capped at 1 MiB.

    Shared by the whole fault suite (installing costs a minute): each test removes the VMs it made, and
    check_consistent() holds between tests whatever a test did to the daemon.
    """
    with test_netns() as ns:
        config = f"console_log_max_mib = {CONSOLE_CAP_MIB}\n"
        with installed_home(debian_kernel, wrap=("ip", "netns", "exec", ns), config=config) as benv:
            yield FaultEnv(benv, ns)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")
