"""What a VMM driver is: the records a launch takes and returns, and the interface every driver offers.

Drivers know nothing of the store: the daemon turns its VM rows into a `VmSpec`, keeps the `VmmHandle`
a launch returns (as `VmmHandle.to_dict()`), and hands it back to `adopt()` after a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from banger.errors import InvalidInputError

# The name the guest agent looks for under /dev/virtio-ports/ when the channel is virtio-serial.
AGENT_PORT_NAME = "org.banger.agent"


class VmmKind(StrEnum):
    """The virtual machine monitors banger can drive."""

    QEMU = "qemu"
    FIRECRACKER = "firecracker"


class AgentTransport(StrEnum):
    """How the host reaches the guest agent."""

    VIRTIO_SERIAL = "virtio-serial"  # QEMU only: a chardev Unix socket wired to port org.banger.agent
    VSOCK = "vsock"  # Firecracker: hybrid vsock over a Unix socket; QEMU: vhost-vsock with a guest CID


class StopOutcome(StrEnum):
    """How a stop ended: the guest shut down by itself, or it had to be killed."""

    GRACEFUL = "graceful"
    KILLED = "killed"
    ALREADY_GONE = "already-gone"


@dataclass(frozen=True)
class Disk:
    """One block device, in the order the guest sees them (vda, vdb, ...)."""

    path: Path
    read_only: bool = False
    format: str = "raw"  # "qcow2" for copy-on-write overlays (clones of a snapshot, under QEMU)


@dataclass(frozen=True)
class NetSpec:
    """A TAP device on the host (already created) and the MAC the guest gets."""

    tap: str
    mac: str


@dataclass(frozen=True)
class AgentChannel:
    """Where the agent channel ends on the host.

    virtio-serial: `socket` is the Unix socket QEMU serves; connect and talk. vsock under Firecracker: `socket`
    is the hybrid vsock Unix socket (connect, send `CONNECT <port>\\n`, read `OK <n>`; guest-initiated connections
    go to a listener the host binds at `<socket>_<port>`) and `guest_cid` the guest's CID. vsock under QEMU:
    only `guest_cid` (vhost-vsock, needs /dev/vhost-vsock).
    """

    transport: AgentTransport
    socket: Path | None = None
    guest_cid: int | None = None

    def __post_init__(self) -> None:
        if self.transport is AgentTransport.VIRTIO_SERIAL and self.socket is None:
            raise InvalidInputError("a virtio-serial agent channel needs a socket path")
        if self.transport is AgentTransport.VSOCK and (self.guest_cid is None or self.guest_cid < 3):
            raise InvalidInputError(f"a vsock agent channel needs a guest CID >= 3 (got {self.guest_cid})")


@dataclass(frozen=True)
class RestoreFrom:
    """A saved machine to resume instead of booting: its device state and the image of its guest RAM.

    A launch with one leaves the guest paused once the state is loaded, so the caller can set its devices up
    (a new identity, the link) before it runs; `resume()` starts it.
    """

    state: Path
    memory: Path


@dataclass(frozen=True)
class VmSpec:
    """Everything a driver needs to start one VM; paths are absolute and already exist (except sockets)."""

    name: str
    vcpus: int
    memory_mib: int
    kernel: Path
    cmdline: str
    console_log: Path
    run_dir: Path
    initrd: Path | None = None
    disks: tuple[Disk, ...] = ()
    net: NetSpec | None = None
    agent: AgentChannel | None = None
    # console.log plus its rotated copy stay within this (see consolelog.py).
    console_log_max_bytes: int = 10 * 1024 * 1024
    # CPU model for software emulation (QEMU TCG: `-cpu MODEL`); hardware virtualisation always uses the host's.
    cpu_model: str | None = None
    restore: RestoreFrom | None = None

    def __post_init__(self) -> None:
        if self.vcpus < 1:
            raise InvalidInputError(f"vcpus must be at least 1 (got {self.vcpus})")
        if self.memory_mib < 64:
            raise InvalidInputError(f"memory must be at least 64 MiB (got {self.memory_mib})")


@dataclass(frozen=True)
class VmmHandle:
    """A running VMM process, identified well enough to find it again after the daemon restarts.

    `start_time` is field 22 of /proc/<pid>/stat (clock ticks since boot): a pid alone could have been
    reused by another process since.
    """

    kind: VmmKind
    pid: int
    start_time: int
    control_socket: Path
    run_dir: Path
    cleanup_paths: tuple[Path, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record of this handle for the store."""
        return {
            "kind": self.kind.value,
            "pid": self.pid,
            "start_time": self.start_time,
            "control_socket": str(self.control_socket),
            "run_dir": str(self.run_dir),
            "cleanup_paths": [str(p) for p in self.cleanup_paths],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmmHandle:
        """Rebuild a handle from `to_dict()` output."""
        try:
            return cls(
                kind=VmmKind(data["kind"]),
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                control_socket=Path(data["control_socket"]),
                run_dir=Path(data["run_dir"]),
                cleanup_paths=tuple(Path(p) for p in data.get("cleanup_paths", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"malformed VMM handle record: {exc}") from exc


SpawnHook = Callable[["VmmHandle"], None]


class VmmDriver(Protocol):
    """What every VMM driver offers; the daemon picks one with `host.select_vmm`."""

    kind: VmmKind
    binary: str

    async def launch(self, spec: VmSpec, on_spawn: SpawnHook | None = None) -> VmmHandle:
        """Start the VMM and boot the guest; on failure nothing is left running.

        `on_spawn` gets the handle as soon as the process exists, before the launch waits on it, so the caller
        can record it (a daemon killed mid-launch must still find the VMM).
        """
        ...

    def adopt(self, handle: VmmHandle) -> VmmHandle | None:
        """The handle again if that exact VMM process still runs (pid, start time, socket), else None."""
        ...

    def is_alive(self, handle: VmmHandle) -> bool:
        """Whether the VMM process of this handle still runs."""
        ...

    async def stop(self, handle: VmmHandle, timeout: float) -> StopOutcome:
        """Ask the guest to shut down; kill the VMM if it has not exited after `timeout` seconds."""
        ...

    async def kill(self, handle: VmmHandle) -> None:
        """Kill the VMM at once and remove its sockets."""
        ...
