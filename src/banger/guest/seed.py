"""The per-VM seed drive: an ext4 image holding banger's guest code and the VM's metadata.

The image's /sbin/banger-init stub mounts it (label BANGERSEED) at /run/banger/seed and runs init.py from it, so
the guest side of banger is upgraded with the host, never baked into images. Layout: the guest modules listed in
GUEST_FILES and meta.json (SeedMeta.to_json).
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import json
import os
import py_compile
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger import proc
from banger.errors import InvalidInputError
from banger.guest.protocol import DEFAULT_VSOCK_PORT, SERIAL_PORT_NAME

SEED_LABEL = "BANGERSEED"
SEED_SIZE = "16M"
META_FILE = "meta.json"
META_VERSION = 1
GUEST_DIR = Path(__file__).resolve().parent
GUEST_FILES = (
    "init.py",
    "agent.py",
    "protocol.py",
    "transfer.py",
    "execs.py",
    "ports.py",
    "guesttunnel.py",
    "sshsetup.py",
    "sessions.py",
    "sessionlog.py",
    "session_agent.py",
)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$"
)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class AgentTransport(enum.StrEnum):
    """How the agent listens; AUTO serves whichever device the VM has (the port name and the vsock port both)."""

    AUTO = "auto"
    VIRTIO_SERIAL = "virtio-serial"
    VSOCK = "vsock"


class HaltAction(enum.StrEnum):
    """What banger-init does last on shutdown: the one that makes this VMM exit."""

    POWEROFF = "poweroff"  # QEMU (ACPI power-off)
    REBOOT = "reboot"  # Firecracker, which exits on a guest reboot and ignores power-off


@dataclass(frozen=True)
class NetInterface:
    """One guest NIC, found in the guest by its MAC address."""

    name: str
    mac: str
    address: str
    prefix: int
    gateway: str | None = None
    mtu: int | None = None

    def __post_init__(self) -> None:
        if not _MAC.match(self.mac.lower()):
            raise InvalidInputError(f"invalid MAC address for {self.name}: {self.mac!r}")
        try:
            net = ipaddress.ip_interface(f"{self.address}/{self.prefix}")
            if self.gateway is not None and ipaddress.ip_address(self.gateway).version != net.version:
                raise ValueError("gateway and address are of different IP versions")
        except ValueError as exc:
            raise InvalidInputError(f"invalid address for {self.name}: {exc}") from exc
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise InvalidInputError(f"invalid MTU for {self.name}: {self.mtu}")


@dataclass(frozen=True)
class Network:
    """Guest network configuration; absent for --net none."""

    interfaces: tuple[NetInterface, ...]
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for ns in self.nameservers:
            try:
                ipaddress.ip_address(ns)
            except ValueError as exc:
                raise InvalidInputError(f"invalid nameserver {ns!r}") from exc
        for domain in self.search:
            if not _HOSTNAME.match(domain):
                raise InvalidInputError(f"invalid search domain {domain!r}")


@dataclass(frozen=True)
class SeedMeta:
    """Everything the guest learns about itself at boot."""

    hostname: str
    vm_name: str
    agent_transport: AgentTransport = AgentTransport.AUTO
    serial_port: str = SERIAL_PORT_NAME
    vsock_port: int = DEFAULT_VSOCK_PORT
    network: Network | None = None
    halt: HaltAction = HaltAction.POWEROFF
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _HOSTNAME.match(self.hostname):
            raise InvalidInputError(f"invalid hostname {self.hostname!r}", hint="letters, digits and '-' only")

    def to_json(self) -> dict[str, Any]:
        """The meta.json document init.py reads (stable keys; version bumps on incompatible change)."""
        net = self.network
        return {
            "version": META_VERSION,
            "hostname": self.hostname,
            "vm_name": self.vm_name,
            "halt": str(self.halt),
            "agent": {
                "transport": str(self.agent_transport),
                "serial_port": self.serial_port,
                "vsock_port": self.vsock_port,
            },
            "network": None
            if net is None
            else {
                "interfaces": [
                    {
                        "name": i.name,
                        "mac": i.mac.lower(),
                        "address": i.address,
                        "prefix": i.prefix,
                        "gateway": i.gateway,
                        "mtu": i.mtu,
                    }
                    for i in net.interfaces
                ],
                "nameservers": list(net.nameservers),
                "search": list(net.search),
            },
            "extra": self.extra,
        }


def compile_guest_modules(directory: Path) -> None:
    """Bytecode for the guest modules in `directory`/__pycache__, so the guest does not compile them at every boot.

    The seed is read-only (the guest could never cache bytecode itself) and built afresh for every boot from the
    very sources beside it, so the bytecode is not checked against them (unchecked-hash). A guest whose Python
    has another bytecode version ignores it and compiles the sources as before.
    """
    cache = directory / "__pycache__"
    cache.mkdir(mode=0o755, exist_ok=True)
    for name in GUEST_FILES:
        target = cache / f"{Path(name).stem}.{sys.implementation.cache_tag}.pyc"
        py_compile.compile(
            str(directory / name),
            cfile=str(target),
            dfile=f"/run/banger/seed/{name}",
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        os.chmod(target, 0o644)


def stage_seed(directory: Path, meta: SeedMeta, *, bytecode: bool = True) -> None:
    """Write the seed's files into `directory` (the future root of the image)."""
    for name in GUEST_FILES:
        shutil.copyfile(GUEST_DIR / name, directory / name)
        os.chmod(directory / name, 0o644)
    if bytecode:
        compile_guest_modules(directory)
    (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
    os.chmod(directory / META_FILE, 0o644)
    os.chmod(directory, 0o755)


def build_seed(out_path: Path, meta: SeedMeta, *, bytecode: bool = True) -> None:
    """Build the seed ext4 image at `out_path` atomically (temp file + rename)."""
    mkfs = proc.which("mkfs.ext4", hint="install e2fsprogs")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_img = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp_img.unlink(missing_ok=True)
    try:
        # Staged next to the image, not in /tmp: what a killed daemon leaves is then swept with the VM's files.
        stage_tmp = tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", suffix=".stage.tmp", dir=out_path.parent)
        with stage_tmp as stage:
            stage_seed(Path(stage), meta, bytecode=bytecode)
            argv = [mkfs, "-q", "-F", "-L", SEED_LABEL, "-m", "0", "-E", "root_owner=0:0", "-d", stage]
            proc.run([*argv, tmp_img, SEED_SIZE], step="build seed drive", timeout=120)
        os.replace(tmp_img, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_img.unlink()
