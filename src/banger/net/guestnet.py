"""What a VM's network looks like from inside: the result of NetworkService.plug()."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

GUEST_MTU = 1500


@dataclass(frozen=True)
class GuestNet:
    """What a plugged VM needs: the VMM's TAP and MAC, and the guest's static address configuration."""

    tap: str
    guest_mac: str
    ip: IPv4Address
    prefix: int
    gateway: IPv4Address
    nameservers: tuple[IPv4Address, ...]
    search: tuple[str, ...]
    mtu: int = GUEST_MTU

    @property
    def interface(self) -> IPv4Interface:
        """The guest address with its prefix length."""
        return IPv4Interface(f"{self.ip}/{self.prefix}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (for the guest's seed metadata)."""
        return {
            "tap": self.tap,
            "mac": self.guest_mac,
            "address": str(self.interface),
            "gateway": str(self.gateway),
            "nameservers": [str(n) for n in self.nameservers],
            "search": list(self.search),
            "mtu": self.mtu,
        }
