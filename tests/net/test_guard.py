"""Guests in their lane (net/guard.py) with real nftables between namespaces: the host's services, spoofing,
--isolate, other bridges left alone, and egress deny/allowlist enforced through banger's DNS.

Namespaces stand in for guests (their veth peer on the bridge is what a TAP would be); tests/vms/test_vm_guard.py
repeats the essentials with real QEMU guests.
"""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from banger.errors import ToolError
from banger.net import guard, nft
from banger.net.dns import DnsServer
from banger.net.dnsthread import DnsThread
from banger.net.guard import GuardState, Lane
from banger.net.nft import NatState
from banger.net.policy import Egress, NetPolicy

from .conftest import GUEST_IP, UPLINK_HOST, UPLINK_OUTSIDE, Namespaces
from .test_dns import QUERY, SERVE_IN_NETNS
from .test_nft import CONNECT, PEER_ECHO

pytestmark = pytest.mark.net

GATEWAY = IPv4Address("172.30.77.1")
SUBNET = IPv4Network("172.30.77.0/24")
GUEST2_IP = "172.30.77.3"


def _mac(netns: Namespaces, ns: str, dev: str = "eth0") -> str:
    return str(netns.ip_json(ns, "link", "show", dev)[0]["address"])


def _lane(netns: Namespaces, ns: str, tap: str, ip: str, policy: NetPolicy | None = None) -> Lane:
    return Lane(vm_id=tap, tap=tap, mac=_mac(netns, ns), ip=IPv4Address(ip), policy=policy or NetPolicy())


def _state(*lanes: Lane) -> GuardState:
    return GuardState("banger0", GATEWAY, SUBNET, lanes)


def _reaches(netns: Namespaces, ns: str, host: str, port: int, timeout: float = 1.5) -> bool:
    try:
        netns.python(ns, CONNECT, host, str(port), str(timeout))
    except ToolError:
        return False
    return True


def _second_guest(netns: Namespaces, host: str) -> str:
    other = netns.new("guest2")
    netns.veth(host, "bg-guest2", other, "eth0")
    netns.ip(host, "link", "set", "bg-guest2", "master", "banger0")
    netns.ip(other, "addr", "add", f"{GUEST2_IP}/24", "dev", "eth0")
    netns.ip(other, "route", "add", "default", "via", str(GATEWAY))
    return other


def test_render_scopes_every_drop_to_banger_bridge_or_taps() -> None:
    lane = Lane("v1", "bg-v1", "52:54:00:00:00:01", IPv4Address(GUEST_IP), NetPolicy(isolate=True, egress=Egress.DENY))
    script = guard.render(_state(lane))
    for line in script.splitlines():
        if line.strip().endswith("drop"):
            assert (
                'iifname "bg-v1"' in line or 'oifname "bg-v1"' in line or "ip saddr" in line or line.strip() == "drop"
            )
    # The bare drops sit behind "iifname != banger0 accept" in their chain.
    chain = script.split("chain input {")[1].split("chain forward {")[0]
    assert chain.index('iifname != "banger0" accept') < chain.index("        drop")


def test_host_services_closed_to_guests_unless_allowed(netns: Namespaces) -> None:
    outside, host, guest = netns.topology()
    for port in ("9999", "53"):
        server = netns.spawn_python(host, PEER_ECHO, "0.0.0.0", port)
        assert netns.wait_line(server) == "ready"
    assert _reaches(netns, guest, str(GATEWAY), 9999)
    # Another bridge on the same host (Docker's, say) with a client of its own: it must not be affected.
    netns.ip(host, "link", "add", "docker0", "type", "bridge")
    netns.ip(host, "addr", "add", "172.31.0.1/24", "dev", "docker0")
    netns.ip(host, "link", "set", "docker0", "up")
    box = netns.new("docker")
    netns.veth(host, "veth-box", box, "eth0")
    netns.ip(host, "link", "set", "veth-box", "master", "docker0")
    netns.ip(box, "addr", "add", "172.31.0.2/24", "dev", "eth0")

    g = guard.Guard(host)
    g.apply(_state(_lane(netns, guest, "bg-guest1", GUEST_IP)))
    assert not _reaches(netns, guest, str(GATEWAY), 9999)
    assert not _reaches(netns, guest, UPLINK_HOST, 9999)  # the host's other addresses too
    assert _reaches(netns, guest, str(GATEWAY), 53)  # banger's DNS stays reachable
    assert _reaches(netns, box, "172.31.0.1", 9999)  # the other bridge's traffic is none of banger's business
    assert _reaches(netns, outside, UPLINK_HOST, 9999)

    g.apply(_state(_lane(netns, guest, "bg-guest1", GUEST_IP, NetPolicy(allow_host=(9999,)))))
    assert _reaches(netns, guest, str(GATEWAY), 9999)
    g.remove()
    tables = netns.exec(host, ["nft", "list", "tables"]).stdout.decode()
    assert "banger_guard" not in tables and "banger_l2" not in tables


def test_spoofed_addresses_are_dropped(netns: Namespaces) -> None:
    _outside, host, guest = netns.topology()
    server = netns.spawn_python(host, PEER_ECHO, str(GATEWAY), "53")
    assert netns.wait_line(server) == "ready"
    guard.Guard(host).apply(_state(_lane(netns, guest, "bg-guest1", GUEST_IP)))
    assert _reaches(netns, guest, str(GATEWAY), 53)
    # Another source address than the lease: dropped on the TAP (and the ARP that would announce it).
    netns.ip(guest, "addr", "flush", "dev", "eth0")
    netns.ip(guest, "addr", "add", "172.30.77.50/24", "dev", "eth0")
    assert not _reaches(netns, guest, str(GATEWAY), 53)
    netns.ip(guest, "addr", "flush", "dev", "eth0")
    netns.ip(guest, "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
    netns.ip(guest, "route", "add", "default", "via", str(GATEWAY))
    assert _reaches(netns, guest, str(GATEWAY), 53)
    # Another MAC: dropped too.
    netns.ip(guest, "link", "set", "eth0", "address", "02:00:00:00:00:99")
    assert not _reaches(netns, guest, str(GATEWAY), 53)


def test_isolate_blocks_vm_to_vm_only(netns: Namespaces) -> None:
    _outside, host, guest = netns.topology()
    other = _second_guest(netns, host)
    for ns, ip in ((guest, GUEST_IP), (other, GUEST2_IP)):
        server = netns.spawn_python(ns, PEER_ECHO, ip, "7000")
        assert netns.wait_line(server) == "ready"
    dns = netns.spawn_python(host, PEER_ECHO, str(GATEWAY), "53")
    assert netns.wait_line(dns) == "ready"
    g = guard.Guard(host)
    lane2 = _lane(netns, other, "bg-guest2", GUEST2_IP)
    g.apply(_state(_lane(netns, guest, "bg-guest1", GUEST_IP), lane2))
    assert _reaches(netns, guest, GUEST2_IP, 7000) and _reaches(netns, other, GUEST_IP, 7000)  # allowed by default
    g.apply(_state(_lane(netns, guest, "bg-guest1", GUEST_IP, NetPolicy(isolate=True)), lane2))
    assert not _reaches(netns, guest, GUEST2_IP, 7000)
    assert not _reaches(netns, other, GUEST_IP, 7000)
    assert _reaches(netns, guest, str(GATEWAY), 53)  # the isolated VM still has its gateway


def test_egress_deny_and_allowlist_through_dns(netns: Namespaces) -> None:
    outside, host, guest = netns.topology()
    netns.ip(outside, "addr", "add", "10.99.0.3/24", "dev", "eth0")
    server = netns.spawn_python(outside, PEER_ECHO, "0.0.0.0", "8000")
    assert netns.wait_line(server) == "ready"
    upstream = netns.spawn_python(outside, SERVE_IN_NETNS, UPLINK_OUTSIDE, "test", "good=10.99.0.2,bad=10.99.0.3")
    assert netns.wait_line(upstream) == "ready"
    nft.enable_forwarding(netns=host)
    nft.apply_ruleset(NatState(), netns=host)
    g = guard.Guard(host)
    dns = DnsServer(str(GATEWAY), 53, domain="vm", records={"g1": GUEST_IP}, upstreams=[UPLINK_OUTSIDE])
    dns.guard = g
    thread = DnsThread(dns, host)
    asyncio.run(thread.start())
    try:

        def ask(name: str) -> list[str]:
            return netns.python(guest, QUERY, str(GATEWAY), name).split()

        def lane(policy: NetPolicy) -> None:
            g.apply(_state(_lane(netns, guest, "bg-guest1", GUEST_IP, policy)))

        lane(NetPolicy())
        assert _reaches(netns, guest, "10.99.0.3", 8000) and ask("bad.test") == ["0", "10.99.0.3"]
        lane(NetPolicy(egress=Egress.DENY))
        assert not _reaches(netns, guest, UPLINK_OUTSIDE, 8000)
        assert ask("g1.vm") == ["0", GUEST_IP]  # .vm names still answer
        assert ask("good.test") == ["5"]  # REFUSED
        lane(NetPolicy(egress=Egress.ALLOWLIST, allow_domains=("good.test",)))
        assert not _reaches(netns, guest, UPLINK_OUTSIDE, 8000)  # not by IP before the name was resolved
        assert ask("good.test") == ["0", UPLINK_OUTSIDE]
        assert _reaches(netns, guest, UPLINK_OUTSIDE, 8000)
        assert ask("bad.test") == ["5"]
        assert not _reaches(netns, guest, "10.99.0.3", 8000)
        listing = json.loads(netns.exec(host, ["nft", "-j", "list", "table", "inet", "banger_guard"]).stdout)
        assert UPLINK_OUTSIDE in json.dumps(listing)  # the learned address sits in the VM's set
        lane(NetPolicy(egress=Egress.ALLOWLIST, allow_domains=("good.test",), allow_cidrs=("10.99.0.3/32",)))
        assert _reaches(netns, guest, "10.99.0.3", 8000)
        assert _reaches(netns, guest, UPLINK_OUTSIDE, 8000)  # learned addresses survive a rebuild of the table
    finally:
        asyncio.run(thread.stop())
