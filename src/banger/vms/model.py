"""VM records as the store keeps them, and the states a VM moves through."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from banger.errors import InvalidInputError


class VmState(StrEnum):
    """created -> starting -> running -> stopping -> stopped; error (with a reason) from anywhere."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


class NetMode(StrEnum):
    """A VM's network: a TAP on banger's bridge, or none at all (the agent works either way)."""

    BRIDGE = "bridge"
    NONE = "none"


def parse_publish(text: str) -> tuple[int, int]:
    """'8080:80' -> (8080, 80); '8080' publishes the same port."""
    host, sep, guest = text.partition(":")
    try:
        pair = (int(host), int(guest) if sep else int(host))
    except ValueError:
        raise InvalidInputError(f"bad --publish {text!r}: use HOST:GUEST, e.g. 8080:80") from None
    for port in pair:
        if not 1 <= port <= 65535:
            raise InvalidInputError(f"bad --publish {text!r}: ports are 1-65535")
    return pair


# States in which a VMM process may exist and must be looked after.
LIVE_STATES = (VmState.STARTING, VmState.RUNNING, VmState.STOPPING)


@dataclass
class VmRecord:
    """One row of the vms table. `spec` holds creation choices; `runtime` what the running VMM needs."""

    id: str
    name: str
    state: VmState
    vmm: str
    kernel: str
    image: str
    vcpus: int
    memory_mib: int
    disk_bytes: int
    created_at: str
    reason: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VmRecord:
        return cls(
            id=row["id"],
            name=row["name"],
            state=VmState(row["state"]),
            vmm=row["vmm"],
            kernel=row["kernel"],
            image=row["image"],
            vcpus=row["vcpus"],
            memory_mib=row["memory_mib"],
            disk_bytes=row["disk_bytes"],
            created_at=row["created_at"],
            reason=row["reason"],
            spec=json.loads(row["spec"] or "{}"),
            runtime=json.loads(row["runtime"]) if row["runtime"] else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The public view (CLI --json)."""
        runtime = self.runtime or {}
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "vmm": self.vmm,
            "kernel": self.kernel,
            "image": self.image,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disk_bytes": self.disk_bytes,
            "created_at": self.created_at,
            "ip": self.spec.get("ip"),
            "net": self.spec.get("net", "none"),
            "pid": (runtime.get("handle") or {}).get("pid"),
        }
