"""Per-VM tunnel settings (the `vm_tunnels` table): automatic forwards, reverse tunnels, SSH keys."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum

from banger.errors import InvalidInputError
from banger.store.db import Store

MAX_KEYS = 64
MAX_KEY_LEN = 16384


class ForwardMode(StrEnum):
    """`--forward-ports`: forward every port a guest process listens on, or none."""

    AUTO = "auto"
    OFF = "off"

    @classmethod
    def parse(cls, text: str) -> ForwardMode:
        try:
            return cls(text)
        except ValueError:
            raise InvalidInputError(f"--forward-ports must be auto or off (got {text!r})") from None


@dataclass(frozen=True)
class Reverse:
    """`--reverse GUEST:HOST`: guest 127.0.0.1:GUEST reaches host 127.0.0.1:HOST."""

    guest_port: int
    host_port: int

    def to_json(self) -> dict[str, int]:
        return {"guest_port": self.guest_port, "host_port": self.host_port}


def parse_reverse(spec: str) -> Reverse:
    """'8080:11434' -> guest 8080 reaches host 11434; '11434' uses the same port on both sides."""
    parts = spec.strip().split(":")
    if len(parts) == 1:
        parts = parts * 2
    try:
        guest, host = (int(p) for p in parts)
    except ValueError:
        raise InvalidInputError(f"bad --reverse {spec!r}: use GUEST:HOST, e.g. 11434:11434") from None
    if not (1 <= guest <= 65535 and 1 <= host <= 65535):
        raise InvalidInputError(f"bad --reverse {spec!r}: ports are 1-65535")
    return Reverse(guest, host)


def check_public_key(key: str) -> str:
    """One OpenSSH public key line ("type base64 [comment]"), or InvalidInputError."""
    key = " ".join(key.split())
    fields = key.split(" ")
    if len(key) > MAX_KEY_LEN or len(fields) < 2 or not (fields[0].startswith(("ssh-", "ecdsa-", "sk-"))):
        raise InvalidInputError(f"not an OpenSSH public key: {key[:40]!r}...")
    return key


@dataclass
class VmTunnelSettings:
    """One row of `vm_tunnels`."""

    forward_ports: ForwardMode
    reverse: list[Reverse] = field(default_factory=list)
    ssh_keys: list[str] = field(default_factory=list)
    host_keys: list[str] = field(default_factory=list)
    sshd: bool | None = None


class SettingsTable:
    """Reads and writes `vm_tunnels`; a VM without a row gets the config defaults."""

    def __init__(self, store: Store, default_mode: ForwardMode) -> None:
        self.store = store
        self.default_mode = default_mode

    def get(self, vm_id: str) -> VmTunnelSettings:
        row = self.store.one("SELECT * FROM vm_tunnels WHERE vm_id=?", (vm_id,))
        if row is None:
            return VmTunnelSettings(self.default_mode)
        return VmTunnelSettings(
            ForwardMode(row["forward_ports"]),
            [Reverse(int(r["guest_port"]), int(r["host_port"])) for r in json.loads(row["reverse"])],
            list(json.loads(row["ssh_keys"])),
            list(json.loads(row["host_keys"])),
            None if row["sshd"] is None else bool(row["sshd"]),
        )

    def put(self, vm_id: str, s: VmTunnelSettings) -> None:
        self.store.execute(
            "INSERT INTO vm_tunnels (vm_id, forward_ports, reverse, ssh_keys, host_keys, sshd) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(vm_id) DO UPDATE SET forward_ports=excluded.forward_ports, reverse=excluded.reverse, "
            "ssh_keys=excluded.ssh_keys, host_keys=excluded.host_keys, sshd=excluded.sshd",
            (
                vm_id,
                s.forward_ports.value,
                json.dumps([r.to_json() for r in s.reverse]),
                json.dumps(s.ssh_keys[:MAX_KEYS]),
                json.dumps(s.host_keys),
                None if s.sshd is None else int(s.sshd),
            ),
        )
