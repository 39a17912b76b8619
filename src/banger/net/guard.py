"""Guests in their lane: banger's filter tables beside its NAT table, rebuilt from the store like it.

- `inet banger_guard`: an input chain for traffic arriving from banger's bridge (the gateway's DNS, ICMP,
  replies, and each VM's `--allow-host` ports; everything else to the host is dropped) and a forward chain
  enforcing each VM's egress policy (`deny`; `allowlist` of CIDRs plus the addresses banger's DNS handed out
  for allowed names, in one set per VM).
- `bridge banger_l2`: per-TAP anti-spoofing (each TAP accepts only frames from its VM's MAC, and IPv4/ARP only
  from its leased address; IPv6 and other ethertypes are dropped) and `--isolate` (no frames between an
  isolated VM and any other TAP). Bridged guest-to-guest frames never reach the IP hooks, hence this family.

Every rule matches `iifname`/`oifname` of banger's bridge or its TAPs: a drop in a base chain is final for the
whole host, so nothing here may touch another bridge's (Docker's, say) traffic. The published-port DNAT
stays in `ip banger` (net/nft.py); these tables only filter. IPv6 is switched off on the bridge device alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network

from banger import proc
from banger.errors import BangerError
from banger.net.policy import Egress, NetPolicy

log = logging.getLogger("banger.net.guard")

GUARD_TABLE = ("inet", "banger_guard")
L2_TABLE = ("bridge", "banger_l2")


@dataclass(frozen=True)
class Lane:
    """One plugged VM as the filters see it."""

    vm_id: str
    tap: str
    mac: str
    ip: IPv4Address
    policy: NetPolicy = field(default_factory=NetPolicy)

    @property
    def set_name(self) -> str:
        """Name of this VM's allowlist set (nft names allow letters, digits and _)."""
        return "allow_" + "".join(c if c.isalnum() else "_" for c in self.tap)


@dataclass(frozen=True)
class GuardState:
    """Everything the two tables express."""

    bridge: str
    gateway: IPv4Address
    subnet: IPv4Network
    lanes: tuple[Lane, ...] = ()
    # Addresses banger's DNS resolved for each VM's allowed names (kept across rebuilds of the table).
    learned: tuple[tuple[str, tuple[IPv4Address, ...]], ...] = ()


def _q(name: str) -> str:
    return json.dumps(name)  # nft string quoting; interface names carry no quotes or backslashes


def _replace(family: str, table: str) -> list[str]:
    # Declaring first makes the delete valid whether or not it existed; nft -f applies the file atomically.
    return [f"table {family} {table}", f"delete table {family} {table}", f"table {family} {table} {{"]


def render(state: GuardState) -> str:
    """The nft script replacing both tables with ones expressing `state`, as one transaction."""
    br, gw = _q(state.bridge), state.gateway
    learned = dict(state.learned)
    lines = _replace(*GUARD_TABLE)
    for lane in state.lanes:
        if lane.policy.egress is Egress.ALLOWLIST:
            elements = [*lane.policy.allow_cidrs, *(str(a) for a in learned.get(lane.vm_id, ()))]
            body = f" elements = {{ {', '.join(elements)} }};" if elements else ""
            lines.append(f"    set {lane.set_name} {{ type ipv4_addr; flags interval; auto-merge;{body} }}")
    lines += [
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        f"        iifname != {br} accept",
        "        ct state established,related accept",
        f"        ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 accept",
        f"        ip daddr {gw} icmp type echo-request accept",
    ]
    for lane in state.lanes:
        if lane.policy.allow_host:
            ports = ", ".join(str(p) for p in lane.policy.allow_host)
            lines.append(f"        ip saddr {lane.ip} tcp dport {{ {ports} }} accept")
    lines += [
        "        drop",
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        f"        iifname != {br} accept",
        f"        oifname {br} accept",
        "        ct state established,related accept",
    ]
    for lane in state.lanes:
        if lane.policy.egress is Egress.DENY:
            lines.append(f"        ip saddr {lane.ip} drop")
        elif lane.policy.egress is Egress.ALLOWLIST:
            lines.append(f"        ip saddr {lane.ip} ip daddr @{lane.set_name} accept")
            lines.append(f"        ip saddr {lane.ip} drop")
    lines += ["    }", "}"]
    lines += _replace(*L2_TABLE)
    lines += ["    chain prerouting {", "        type filter hook prerouting priority filter; policy accept;"]
    for lane in state.lanes:
        tap = _q(lane.tap)
        lines += [
            f"        iifname {tap} ether saddr != {lane.mac} drop",
            f"        iifname {tap} ether type != {{ ip, arp }} drop",
            f"        iifname {tap} ether type ip ip saddr != {lane.ip} drop",
            f"        iifname {tap} ether type arp arp saddr ether != {lane.mac} drop",
            f"        iifname {tap} ether type arp arp saddr ip != {lane.ip} drop",
        ]
    lines += ["    }", "    chain forward {", "        type filter hook forward priority filter; policy accept;"]
    for lane in state.lanes:
        if lane.policy.isolate:
            lines += [f"        iifname {_q(lane.tap)} drop", f"        oifname {_q(lane.tap)} drop"]
    lines += ["    }", "}", ""]
    return "\n".join(lines)


def _prefix(netns: str | None) -> list[str]:
    return [proc.which("ip"), "netns", "exec", netns] if netns else []


def _nft(netns: str | None, script: str, step: str) -> None:
    argv = [*_prefix(netns), proc.which("nft", hint="install the nftables package"), "-f", "-"]
    proc.run(argv, input=script.encode(), step=step, timeout=30)


def remove(*, netns: str | None = None) -> None:
    """Delete both tables if they exist (idempotent, atomic)."""
    script = "".join(f"table {f} {t}\ndelete table {f} {t}\n" for f, t in (GUARD_TABLE, L2_TABLE))
    _nft(netns, script, "remove banger guard tables")


def disable_ipv6(bridge: str, *, netns: str | None = None) -> bool:
    """IPv6 off on banger's bridge only, so guests find no host service on a link-local address; False when
    this kernel has no IPv6 on that device (nothing to switch off)."""
    argv = [*_prefix(netns), proc.which("sysctl"), "-q", "-w", f"net.ipv6.conf.{bridge}.disable_ipv6=1"]
    try:
        proc.run(argv, step="disable IPv6 on the bridge", timeout=30)
    except BangerError as exc:
        log.info("guard: IPv6 not switched off on %s: %s", bridge, exc)
        return False
    return True


class Guard:
    """Keeps the two tables in line with the plugged VMs and their policies, and answers banger's DNS about
    which names a guest may resolve (and adds what they resolve to to that guest's allowlist set)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lock = threading.RLock()
        self._state: GuardState | None = None
        self._applied: str | None = None
        self._learned: dict[str, set[IPv4Address]] = {}

    def apply(self, state: GuardState) -> None:
        """Make the kernel's tables express `state` (a no-op when nothing changed)."""
        with self._lock:
            live = {lane.vm_id for lane in state.lanes}
            self._learned = {k: v for k, v in self._learned.items() if k in live}
            learned = tuple((k, tuple(sorted(v))) for k, v in sorted(self._learned.items()))
            state = replace(state, learned=learned)
            script = render(state)
            if script != self._applied:
                _nft(self.netns, script, "apply banger guard tables")
                self._applied = script
            self._state = state

    def remove(self) -> None:
        """Delete both tables (network teardown)."""
        with self._lock:
            remove(netns=self.netns)
            self._state, self._applied, self._learned = None, None, {}

    def lane_of(self, client: str) -> Lane | None:
        """The plugged VM with this source address, if any."""
        with contextlib.suppress(ValueError):
            address = IPv4Address(client)
            state = self._state
            for lane in state.lanes if state else ():
                if lane.ip == address:
                    return lane
        return None

    def may_resolve(self, client: str | None, qname: str) -> bool:
        """Whether banger's DNS forwards this (non-.vm) name for this client."""
        lane = self.lane_of(client) if client else None
        return lane is None or lane.policy.allows_name(qname)

    def learn(self, client: str | None, addresses: Iterable[IPv4Address]) -> None:
        """Let an allowlist guest reach the addresses an allowed name resolved to (before it sees the answer)."""
        lane = self.lane_of(client) if client else None
        if lane is None or lane.policy.egress is not Egress.ALLOWLIST:
            return
        with self._lock:
            new = set(addresses) - self._learned.get(lane.vm_id, set())
            if not new:
                return
            self._learned.setdefault(lane.vm_id, set()).update(new)
            family, table = GUARD_TABLE
            elements = ", ".join(str(a) for a in sorted(new))
            _nft(self.netns, f"add element {family} {table} {lane.set_name} {{ {elements} }}\n", "allow resolved")


LaneSource = Callable[[], Sequence[Lane]]
