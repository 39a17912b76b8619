"""banger's nftables table: rendering, atomic replace/remove, and real NAT between namespaces."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from banger.errors import InvalidInputError, ToolError
from banger.net import nft
from banger.net.nft import NatState, PortForward, Proto

from .conftest import GUEST_IP, UPLINK_HOST, UPLINK_OUTSIDE, Namespaces

GUEST = IPv4Address(GUEST_IP)

# Tiny TCP server: tells each client the source address it saw, then hangs up.
PEER_ECHO = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""

CONNECT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(c.recv(100).decode())
"""

UNRELATED = """
table inet keepme {
    chain input {
        type filter hook input priority 10; policy accept;
        tcp dport 2222 counter accept
    }
}
table ip nat {
    chain postrouting {
        type nat hook postrouting priority 50; policy accept;
    }
}
"""


def _state(*forwards: PortForward) -> NatState:
    return NatState(subnet=IPv4Network("172.30.77.0/24"), bridge="banger0", forwards=forwards)


def test_render_contains_the_rules() -> None:
    text = nft.render_ruleset(_state(PortForward(8080, GUEST, 80), PortForward(5353, GUEST, 53, Proto.UDP)))
    assert text.startswith("table ip banger\ndelete table ip banger\ntable ip banger {")
    assert 'ip saddr 172.30.77.0/24 oifname != "banger0" masquerade' in text
    assert "fib daddr type local tcp dport 8080 dnat to 172.30.77.2:80" in text
    assert "ip daddr != 127.0.0.0/8 fib daddr type local udp dport 5353 dnat to 172.30.77.2:53" in text
    assert 'oifname "banger0" ct state established,related accept' in text


def test_state_validation() -> None:
    with pytest.raises(InvalidInputError, match="outside"):
        _state(PortForward(8080, IPv4Address("10.0.0.5"), 80))
    with pytest.raises(InvalidInputError, match="published twice"):
        _state(PortForward(8080, GUEST, 80), PortForward(8080, GUEST, 81))
    _state(PortForward(8080, GUEST, 80), PortForward(8080, GUEST, 80, Proto.UDP))  # tcp and udp may share
    with pytest.raises(InvalidInputError, match="out of range"):
        PortForward(0, GUEST, 80)
    with pytest.raises(InvalidInputError):
        NatState(bridge="bad name")


def _other_tables(netns: Namespaces, ns: str) -> str:
    return (
        netns.exec(ns, ["nft", "list", "table", "inet", "keepme"]).stdout.decode()
        + netns.exec(ns, ["nft", "list", "table", "ip", "nat"]).stdout.decode()
    )


@pytest.mark.net
def test_apply_replace_remove_leave_other_tables_alone(netns: Namespaces) -> None:
    ns = netns.new("nft")
    netns.exec(ns, ["nft", "-f", "-"], input=UNRELATED.encode())
    before = _other_tables(netns, ns)
    assert nft.read_table(netns=ns) is None

    nft.apply_ruleset(_state(PortForward(8080, GUEST, 80)), netns=ns)
    first = nft.read_table(netns=ns)
    assert first is not None and "dport 8080" in first

    nft.apply_ruleset(_state(PortForward(9090, GUEST, 90)), netns=ns)
    second = nft.read_table(netns=ns)
    assert second is not None and "dport 9090" in second and "dport 8080" not in second
    objects = nft.read_table_json(netns=ns)
    assert objects is not None
    chains = {o["chain"]["name"] for o in objects if "chain" in o}
    assert chains == {"postrouting", "prerouting", "output", "forward"}
    assert _other_tables(netns, ns) == before

    nft.remove_table(netns=ns)
    nft.remove_table(netns=ns)  # idempotent
    assert nft.read_table(netns=ns) is None
    assert not nft.table_exists(netns=ns)
    assert _other_tables(netns, ns) == before


@pytest.mark.net
def test_failed_transaction_keeps_previous_table(netns: Namespaces) -> None:
    # apply_ruleset relies on nft applying a whole file or nothing: a script whose last line is bad
    # must leave the previous table exactly as it was, not deleted.
    ns = netns.new("atomic")
    nft.apply_ruleset(_state(PortForward(8080, GUEST, 80)), netns=ns)
    before = nft.read_table(netns=ns)
    broken = nft.render_ruleset(_state()) + "add rule ip banger forward bogus syntax here\n"
    with pytest.raises(ToolError):
        netns.exec(ns, ["nft", "-f", "-"], input=broken.encode())
    assert nft.read_table(netns=ns) == before


@pytest.mark.net
def test_forwarding_sysctl_roundtrip(netns: Namespaces) -> None:
    ns = netns.new("sysctl")

    def current() -> str:
        return netns.exec(ns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.decode().strip()

    netns.exec(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
    assert nft.enable_forwarding(netns=ns) == "0"
    assert current() == "1"
    assert nft.enable_forwarding(netns=ns) == "1"
    nft.restore_forwarding("0", netns=ns)
    assert current() == "0"


def _connect(netns: Namespaces, ns: str, host: str, port: int, timeout: float = 3.0) -> str | None:
    try:
        return netns.python(ns, CONNECT, host, str(port), str(timeout)).strip()
    except ToolError:
        return None


@pytest.mark.net
def test_guest_reaches_outside_through_masquerade(netns: Namespaces) -> None:
    outside, host, guest = netns.topology()
    server = netns.spawn_python(outside, PEER_ECHO, UPLINK_OUTSIDE, "8000")
    assert netns.wait_line(server) == "ready"
    nft.enable_forwarding(netns=host)

    # Without banger's table the outside world has no route back to the guest subnet.
    assert _connect(netns, guest, UPLINK_OUTSIDE, 8000, timeout=1.0) is None

    nft.apply_ruleset(_state(), netns=host)
    assert _connect(netns, guest, UPLINK_OUTSIDE, 8000) == UPLINK_HOST, "server must see the host's uplink address"

    nft.remove_table(netns=host)
    assert _connect(netns, guest, UPLINK_OUTSIDE, 8000, timeout=1.0) is None


@pytest.mark.net
def test_published_port_reaches_guest(netns: Namespaces) -> None:
    outside, host, guest = netns.topology()
    server = netns.spawn_python(guest, PEER_ECHO, "0.0.0.0", "80")
    assert netns.wait_line(server) == "ready"
    nft.enable_forwarding(netns=host)
    nft.apply_ruleset(_state(PortForward(8080, GUEST, 80)), netns=host)

    # From outside: DNAT in prerouting; the guest sees the real client address (no masquerade inbound).
    assert _connect(netns, outside, UPLINK_HOST, 8080) == UPLINK_OUTSIDE
    # From the host itself, to its own address: DNAT in the output hook.
    assert _connect(netns, host, UPLINK_HOST, 8080) == UPLINK_HOST
    other = netns.new("guest2")
    netns.veth(host, "bg-guest2", other, "eth0")
    netns.ip(host, "link", "set", "bg-guest2", "master", "banger0")
    netns.ip(other, "addr", "add", "172.30.77.3/24", "dev", "eth0")
    netns.ip(other, "route", "add", "default", "via", "172.30.77.1")
    # Guest to guest over the bridge is never NAT'ed, with bridge netfilter on (the netns default here) or off.
    assert _connect(netns, other, GUEST_IP, 80) == "172.30.77.3"
    # From another guest through the host's address (hairpin): masqueraded to the gateway so the reply goes back
    # through the host. Bridge netfilter is switched off so the test shows the rule is needed on hosts without
    # br_netfilter (with it, conntrack on the bridge would mend the asymmetric reply by itself).
    netns.exec(host, ["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0"])
    assert _connect(netns, other, GUEST_IP, 80) == "172.30.77.3"
    assert _connect(netns, other, UPLINK_HOST, 8080) == "172.30.77.1"
    # Loopback is deliberately not forwarded (see banger.net.nft's docstring).
    assert _connect(netns, host, "127.0.0.1", 8080, timeout=1.0) is None

    nft.apply_ruleset(_state(), netns=host)  # unpublish
    assert _connect(netns, outside, UPLINK_HOST, 8080, timeout=1.0) is None
