"""Host NAT for guests, kept entirely in banger's own nftables table (`table ip banger`).

What banger changes on the host, and nothing else:
- the table `ip banger` (created, replaced and deleted as a whole, each in one `nft -f -` transaction), holding
  * postrouting: masquerade of the guest subnet when it leaves through any interface but the bridge, and of
    guests reaching published ports through the host's address (hairpin);
  * forward: accept bridge -> anywhere, and established/related or DNAT'ed traffic back to the bridge;
  * prerouting + output: DNAT of published ports (`--publish HOST:GUEST`) to guest:GUEST.
- the sysctl net.ipv4.ip_forward, set to 1 by `enable_forwarding()` (which returns the previous value so
  `restore_forwarding()` can put it back).
banger does not load or configure br_netfilter (bridge-nf). Where it is loaded (bridge-nf-call-iptables=1),
bridged guest-to-guest traffic also passes the forward hooks: ours accepts it, but another table's drop policy
(docker sets FORWARD to drop) would then cut guests off from each other; `sysctl net.bridge.bridge-nf-call-iptables=0`
is the fix, left to the user because other software may rely on it.

Caveats, by choice:
- Accept verdicts are per table: if another table (firewalld, docker's iptables-nft FORWARD policy drop) drops
  forwarded packets, ours cannot override it; `network status` shows our table so users can see what we add.
- Published ports are reachable on the host's own addresses (from outside through prerouting, from the host itself
  through the output hook), but not on 127.0.0.1: DNAT of loopback-sourced packets out of the bridge needs
  net.ipv4.conf.<bridge>.route_localnet=1 plus masquerading 127.0.0.0/8, which weakens the host's martian checks.
  From the host, reach a guest directly at its address instead.
- A guest cannot reach its own published port through the host's address (the kernel drops the packet whose
  source and DNAT'ed destination are the same); other guests can (hairpin masquerade).

Every function takes `netns`: when set, commands run as `ip netns exec NETNS ...` (tests never touch the host).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from banger import proc
from banger.errors import InvalidInputError, ToolError
from banger.net.links import DEFAULT_BRIDGE, DEFAULT_SUBNET, check_ifname

TABLE = "banger"
FAMILY = "ip"
_FORWARD_SYSCTL = "net.ipv4.ip_forward"
# nft and sysctl answer in milliseconds; one that does not within this is stuck (a wedged netlink, say).
TOOL_TIMEOUT = 30.0


class Proto(StrEnum):
    """Transport protocol of a published port."""

    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class PortForward:
    """Host port -> guest address and port."""

    host_port: int
    guest_ip: IPv4Address
    guest_port: int
    proto: Proto = Proto.TCP
    # Only traffic to this host address is DNAT'ed; None means every local address (`--publish 0.0.0.0:...`).
    address: IPv4Address | None = None

    def __post_init__(self) -> None:
        for port in (self.host_port, self.guest_port):
            if not 1 <= port <= 65535:
                raise InvalidInputError(f"port {port} is out of range 1-65535")


@dataclass(frozen=True)
class NatState:
    """Everything banger's table should express; `apply_ruleset` makes the kernel match it."""

    subnet: IPv4Network = DEFAULT_SUBNET
    bridge: str = DEFAULT_BRIDGE
    forwards: Sequence[PortForward] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        check_ifname(self.bridge)
        seen: set[tuple[Proto, int]] = set()
        for fwd in self.forwards:
            if fwd.guest_ip not in self.subnet:
                raise InvalidInputError(f"published port target {fwd.guest_ip} is outside {self.subnet}")
            key = (fwd.proto, fwd.host_port)
            if key in seen:
                raise InvalidInputError(f"host port {fwd.proto}/{fwd.host_port} is published twice")
            seen.add(key)


def _prefix(netns: str | None) -> list[str]:
    return [proc.which("ip"), "netns", "exec", netns] if netns else []


def _nft(netns: str | None, args: Sequence[str], *, input: bytes | None = None, step: str) -> str:
    argv = [*_prefix(netns), proc.which("nft", hint="install the nftables package"), *args]
    return proc.run(argv, input=input, step=step, timeout=TOOL_TIMEOUT).stdout.decode()


def _match(address: IPv4Address | None, *, loopback: bool) -> str:
    if address is not None:
        return f"ip daddr {address}"
    return "fib daddr type local" if loopback else "ip daddr != 127.0.0.0/8 fib daddr type local"


def render_ruleset(state: NatState) -> str:
    """The nft script that replaces banger's table with one expressing `state`, as one transaction."""
    bridge = json.dumps(state.bridge)  # nft string quoting; interface names carry no quotes or backslashes
    dnat = [(f.address, f"{f.proto} dport {f.host_port} dnat to {f.guest_ip}:{f.guest_port}") for f in state.forwards]
    # Declaring the table first makes the delete valid whether or not it existed; nft applies the whole
    # file atomically, so readers see either the old table or the new one, never a half state.
    lines = [
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f"        ip saddr {state.subnet} oifname != {bridge} masquerade",
        # Hairpin: a guest reaching a published port via the host's address gets DNAT'ed back onto the bridge;
        # without this the target guest would answer the client guest directly and the reply would be dropped.
        f"        ip saddr {state.subnet} oifname {bridge} ct status dnat masquerade",
        "    }",
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
        *(f"        {_match(addr, loopback=True)} {rule}" for addr, rule in dnat),
        "    }",
        "    chain output {",
        "        type nat hook output priority -100; policy accept;",
        # Loopback is left alone: a DNAT'ed packet from 127.0.0.1 would be dropped as martian (module docstring).
        *(f"        {_match(addr, loopback=False)} {rule}" for addr, rule in dnat),
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        f"        iifname {bridge} ip saddr {state.subnet} accept",
        f"        oifname {bridge} ct state established,related accept",
        f"        oifname {bridge} ct status dnat accept",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


def apply_ruleset(state: NatState, *, netns: str | None = None) -> None:
    """Replace banger's table with one expressing `state`, atomically."""
    _nft(netns, ["-f", "-"], input=render_ruleset(state).encode(), step="apply banger nftables table")


def remove_table(*, netns: str | None = None) -> None:
    """Delete banger's table if it exists (idempotent, atomic)."""
    script = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
    _nft(netns, ["-f", "-"], input=script.encode(), step="remove banger nftables table")


def table_exists(*, netns: str | None = None) -> bool:
    """Whether banger's table is present."""
    tables = _nft(netns, ["-j", "list", "tables"], step="list nftables tables")
    return any(
        "table" in item and item["table"].get("name") == TABLE and item["table"].get("family") == FAMILY
        for item in json.loads(tables).get("nftables", [])
    )


def read_table(*, netns: str | None = None) -> str | None:
    """banger's table as nft prints it (for `network status`), or None if it does not exist."""
    if not table_exists(netns=netns):
        return None
    return _nft(netns, ["list", "table", FAMILY, TABLE], step="list banger nftables table")


def read_table_json(*, netns: str | None = None) -> list[dict[str, Any]] | None:
    """banger's table in nft's JSON form (list of objects), or None if it does not exist."""
    if not table_exists(netns=netns):
        return None
    out = _nft(netns, ["-j", "list", "table", FAMILY, TABLE], step="list banger nftables table")
    objects: list[dict[str, Any]] = json.loads(out).get("nftables", [])
    return [o for o in objects if "metainfo" not in o]


def _sysctl(netns: str | None, args: Sequence[str], step: str) -> str:
    argv = [*_prefix(netns), proc.which("sysctl", hint="install the procps package"), *args]
    return proc.run(argv, step=step, timeout=TOOL_TIMEOUT).stdout.decode().strip()


def enable_forwarding(*, netns: str | None = None) -> str:
    """Set net.ipv4.ip_forward=1 and return the previous value, for `restore_forwarding`."""
    previous = _sysctl(netns, ["-n", _FORWARD_SYSCTL], "read ip_forward")
    if previous not in ("0", "1"):
        raise ToolError(f"unexpected {_FORWARD_SYSCTL} value {previous!r}")
    if previous != "1":
        _sysctl(netns, ["-q", "-w", f"{_FORWARD_SYSCTL}=1"], "enable ip_forward")
    return previous


def restore_forwarding(previous: str, *, netns: str | None = None) -> None:
    """Put net.ipv4.ip_forward back to a value returned by `enable_forwarding`."""
    if previous not in ("0", "1"):
        raise InvalidInputError(f"not an ip_forward value: {previous!r}")
    _sysctl(netns, ["-q", "-w", f"{_FORWARD_SYSCTL}={previous}"], "restore ip_forward")
