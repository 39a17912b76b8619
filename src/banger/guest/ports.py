"""Listening sockets of a Linux system, read from /proc (stdlib only: ships on the seed drive)."""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import asdict, dataclass
from typing import Any

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"
_FILES = {"tcp": "tcp", "tcp6": "tcp6", "udp": "udp", "udp6": "udp6"}


@dataclass(frozen=True)
class ListeningPort:
    """One listening TCP socket or bound, unconnected UDP socket, with its owner when known."""

    proto: str
    address: str
    port: int
    inode: int
    pid: int | None = None
    comm: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for the wire."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ListeningPort:
        """Inverse of to_json."""
        pid, comm = data.get("pid"), data.get("comm")
        return cls(
            str(data["proto"]),
            str(data["address"]),
            int(data["port"]),
            int(data["inode"]),
            None if pid is None else int(pid),
            None if comm is None else str(comm),
        )


def decode_address(hex_addr: str) -> str:
    """Turn /proc/net's hex address (host-order 32-bit words) into text."""
    raw = bytes.fromhex(hex_addr)
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    return str(ipaddress.ip_address(struct.pack(f">{len(words)}I", *words)))


def parse_proc_net(text: str, proto: str) -> list[ListeningPort]:
    """Listening entries of one /proc/net/{tcp,tcp6,udp,udp6} table."""
    wanted = _TCP_LISTEN if proto.startswith("tcp") else _UDP_UNCONNECTED
    found = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or cols[3] != wanted:
            continue
        addr, port = cols[1].split(":")
        if proto.startswith("udp") and not cols[2].endswith(":0000"):
            continue
        found.append(ListeningPort(proto, decode_address(addr), int(port, 16), int(cols[9])))
    return found


def socket_owners(proc: str = "/proc") -> dict[int, tuple[int, str]]:
    """Map socket inode -> (pid, comm) by reading every /proc/<pid>/fd we are allowed to."""
    owners: dict[int, tuple[int, str]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        try:
            links = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
            with open(os.path.join(proc, entry, "comm")) as f:
                comm = f.read().strip()
        except OSError:
            continue  # the process exited or is not ours to inspect
        for link in links:
            if link.startswith("socket:["):
                owners.setdefault(int(link[8:-1]), (int(entry), comm))
    return owners


def listening_ports(proc: str = "/proc") -> list[ListeningPort]:
    """All listening sockets visible in this network namespace, with owning pid/comm."""
    ports: list[ListeningPort] = []
    for proto, name in _FILES.items():
        try:
            with open(os.path.join(proc, "net", name)) as f:
                ports += parse_proc_net(f.read(), proto)
        except FileNotFoundError:
            continue  # e.g. IPv6 disabled
    owners = socket_owners(proc)
    return [
        ListeningPort(p.proto, p.address, p.port, p.inode, *owners.get(p.inode, (None, None)))
        for p in sorted(ports, key=lambda p: (p.proto, p.port, p.address))
    ]
