"""The host side of guest networking: one bridge (the guests' gateway) and one TAP device per VM, via netlink.

Everything here is synchronous (pyroute2's IPRoute); async callers run it with `asyncio.to_thread`.
A `Links` object can be bound to a named network namespace so tests never touch the root namespace.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Set
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from banger.errors import InUseError, InvalidInputError, NotFoundError, ToolError

DEFAULT_BRIDGE = "banger0"
DEFAULT_SUBNET = IPv4Network("172.30.77.0/24")
TAP_PREFIX = "bg-"
IFNAMSIZ = 15  # kernel limit on interface names, without the trailing NUL
NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` pins named namespaces

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_ENODEV = 19
_EEXIST = 17


@dataclass(frozen=True)
class BridgeConfig:
    """Name and subnet of banger's bridge; the bridge holds the subnet's first host address."""

    name: str = DEFAULT_BRIDGE
    subnet: IPv4Network = field(default=DEFAULT_SUBNET)

    def __post_init__(self) -> None:
        check_ifname(self.name)
        if self.subnet.prefixlen > 30:
            raise InvalidInputError(f"subnet {self.subnet} is too small for guests (need /30 or larger)")

    @property
    def gateway(self) -> IPv4Address:
        """The bridge's address, which guests use as their default gateway (and DNS server)."""
        return self.subnet.network_address + 1

    @property
    def interface(self) -> IPv4Interface:
        """Gateway address with the subnet's prefix length, as configured on the bridge."""
        return IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")


@dataclass(frozen=True)
class TapInfo:
    """One TAP device as seen in the kernel."""

    name: str
    index: int
    mac: str
    master: str | None
    up: bool


def check_ifname(name: str) -> None:
    """Raise InvalidInputError unless `name` is a valid Linux interface name."""
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise InvalidInputError(f"invalid interface name {name!r} (1-{IFNAMSIZ} chars, no '/' or spaces)")


def tap_name(vm_id: str, prefix: str = TAP_PREFIX) -> str:
    """The TAP name for a VM: prefix plus as much of the id as fits in 15 characters."""
    room = IFNAMSIZ - len(prefix)
    if room < 4:
        raise InvalidInputError(f"TAP prefix {prefix!r} leaves too little room for the VM id")
    short = "".join(c for c in vm_id.lower() if c.isalnum())[:room]
    if not short:
        raise InvalidInputError(f"VM id {vm_id!r} has no usable characters for a TAP name")
    name = prefix + short
    check_ifname(name)
    return name


def mac_for(seed: str) -> str:
    """A stable MAC derived from `seed`: hash with the locally administered, unicast bits set."""
    digest = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    # Bit 1 set = locally administered (never clashes with vendor MACs); bit 0 clear = unicast.
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def guest_mac(vm_id: str) -> str:
    """The MAC of the VM's own virtio-net interface (what the VMM is told)."""
    return mac_for(f"guest:{vm_id}")


def tap_mac(vm_id: str) -> str:
    """The MAC of the host-side TAP device; it must differ from the guest's.

    A bridge treats its ports' own MACs as local addresses, so a TAP carrying the guest's MAC would make the
    host swallow frames meant for the guest.
    """
    return mac_for(f"tap:{vm_id}")


class Links:
    """A netlink session (optionally inside a named netns) that creates, inspects and removes banger's links."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        # pyroute2 silently creates a missing namespace; a typo must not leave a stray one behind.
        if netns is not None and not (NETNS_RUN_DIR / netns).exists():
            raise NotFoundError(f"network namespace {netns!r} does not exist")
        try:
            self._ipr: Any = IPRoute(netns=netns) if netns else IPRoute()
        except (OSError, NetlinkError) as exc:
            where = f" in netns {netns!r}" if netns else ""
            raise ToolError(f"cannot open a netlink socket{where}: {exc}") from exc

    def close(self) -> None:
        """Close the netlink socket."""
        self._ipr.close()

    def __enter__(self) -> Links:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- lookups -------------------------------------------------------------------------------------------

    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def _link(self, index: int) -> Any:
        return self._ipr.get_links(index)[0]

    def _kind(self, link: Any) -> str | None:
        info = link.get("IFLA_LINKINFO")
        return None if info is None else info.get("IFLA_INFO_KIND")

    def _name_of(self, index: int | None) -> str | None:
        if not index:
            return None
        return str(self._link(index).get("ifname"))

    def _tap_info(self, link: Any) -> TapInfo:
        return TapInfo(
            name=str(link.get("ifname")),
            index=int(link["index"]),
            mac=str(link.get("address")),
            master=self._name_of(link.get("master")),
            up=bool(link["flags"] & 1),
        )

    # -- bridge --------------------------------------------------------------------------------------------

    def ensure_bridge(self, config: BridgeConfig = BridgeConfig()) -> int:
        """Create the bridge if missing, give it the gateway address, bring it up; return its index."""
        index = self._index(config.name)
        if index is None:
            # A fixed MAC: otherwise the bridge takes its lowest port's MAC, which changes as TAPs come and go
            # and leaves guests with stale ARP entries for their gateway.
            mac = mac_for(f"bridge:{config.name}")
            self._call("create bridge", "link", "add", ifname=config.name, kind="bridge", address=mac)
            index = self._index(config.name)
            if index is None:
                raise ToolError(f"bridge {config.name} vanished right after creation")
        elif self._kind(self._link(index)) != "bridge":
            raise InUseError(f"interface {config.name} exists and is not a bridge")
        wanted = config.interface
        have = {(a.get("address"), a["prefixlen"]) for a in self._ipr.get_addr(index=index, family=2)}
        if (str(wanted.ip), wanted.network.prefixlen) not in have:
            self._call(
                "address bridge", "addr", "add", index=index, address=str(wanted.ip), prefixlen=wanted.network.prefixlen
            )
        self._call("bring bridge up", "link", "set", index=index, state="up")
        return index

    def remove_bridge(self, name: str = DEFAULT_BRIDGE) -> bool:
        """Delete the bridge if present; True if something was removed."""
        return self._remove(name, "bridge")

    def bridge_addresses(self, name: str = DEFAULT_BRIDGE) -> list[IPv4Interface]:
        """IPv4 addresses configured on the bridge (empty if it does not exist)."""
        index = self._index(name)
        if index is None:
            return []
        return [
            IPv4Interface(f"{a.get('address')}/{a['prefixlen']}") for a in self._ipr.get_addr(index=index, family=2)
        ]

    # -- TAPs ----------------------------------------------------------------------------------------------

    def ensure_tap(self, name: str, mac: str, bridge: str = DEFAULT_BRIDGE, *, owner: int | None = None) -> TapInfo:
        """Create a persistent TAP (if missing) with host-side MAC `mac` (see tap_mac), attach it, bring it up."""
        check_ifname(name)
        if not _MAC_RE.fullmatch(mac):
            raise InvalidInputError(f"invalid MAC address {mac!r}")
        bridge_index = self._index(bridge)
        if bridge_index is None:
            raise ToolError(f"bridge {bridge} does not exist; create it before attaching {name}")
        index = self._index(name)
        created = index is None
        if index is None:
            # Same flags the VMMs open the device with (no packet-info header, virtio-net header).
            extra: dict[str, Any] = {"ifr": {"no_pi": True, "vnet_hdr": True}}
            if owner is not None:
                extra["uid"] = owner
            self._call(f"create TAP {name}", "link", "add", ifname=name, kind="tuntap", mode="tap", **extra)
            index = self._index(name)
            if index is None:
                raise ToolError(f"TAP {name} vanished right after creation")
        elif self._kind(self._link(index)) != "tun":
            raise InUseError(f"interface {name} exists and is not a TAP device")
        try:
            return self._configure_tap(index, name, mac, bridge, bridge_index)
        except BaseException:
            if created:  # do not leave a half-configured TAP behind
                self._remove(name, "tun")
            raise

    def _configure_tap(self, index: int, name: str, mac: str, bridge: str, bridge_index: int) -> TapInfo:
        link = self._link(index)
        if str(link.get("address")).lower() != mac.lower():
            # The MAC can only change while the link is down.
            self._call(f"set MAC of {name}", "link", "set", index=index, state="down")
            self._call(f"set MAC of {name}", "link", "set", index=index, address=mac)
        if link.get("master") != bridge_index:
            self._call(f"attach {name} to {bridge}", "link", "set", index=index, master=bridge_index)
        self._call(f"bring {name} up", "link", "set", index=index, state="up")
        return self._tap_info(self._link(index))

    def remove_tap(self, name: str) -> bool:
        """Delete a TAP if present; True if something was removed."""
        return self._remove(name, "tun")

    def get_tap(self, name: str) -> TapInfo | None:
        """The TAP with this name, or None."""
        index = self._index(name)
        if index is None:
            return None
        link = self._link(index)
        return self._tap_info(link) if self._kind(link) == "tun" else None

    def list_taps(self, prefix: str = TAP_PREFIX) -> list[TapInfo]:
        """All TAP devices whose name starts with `prefix`, sorted by name (for reconciliation at startup)."""
        taps = [
            self._tap_info(link)
            for link in self._ipr.get_links()
            if str(link.get("ifname")).startswith(prefix) and self._kind(link) == "tun"
        ]
        return sorted(taps, key=lambda t: t.name)

    def prune_taps(self, keep: Set[str], prefix: str = TAP_PREFIX) -> list[str]:
        """Remove banger's TAPs (by prefix) not named in `keep`; return the names removed."""
        removed = [t.name for t in self.list_taps(prefix) if t.name not in keep and self.remove_tap(t.name)]
        return removed

    # -- plumbing ------------------------------------------------------------------------------------------

    def _remove(self, name: str, kind: str) -> bool:
        index = self._index(name)
        if index is None:
            return False
        if self._kind(self._link(index)) != kind:
            raise InUseError(f"refusing to delete {name}: it is not a {kind} device banger created")
        try:
            self._ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == _ENODEV:  # deleted concurrently; the goal is reached all the same
                return False
            raise ToolError(f"delete {name}: {exc}") from exc
        return True

    def _call(self, step: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._ipr, method)(*args, **kwargs)
        except NetlinkError as exc:
            if exc.code == _EEXIST and method == "addr":
                return None
            raise ToolError(f"{step}: {exc}") from exc
