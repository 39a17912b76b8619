"""The guests' DNS server, queried over real sockets on loopback, with a real (tiny) upstream server."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord

from banger.errors import InvalidInputError
from banger.net.dns import DnsServer, Upstream, resolved_running, systemd_resolved_setup, upstream_resolvers

from .conftest import GUEST_IP, UPLINK_OUTSIDE, Namespaces

LOOPBACK = "127.0.0.1"


class FakeUpstream:
    """A minimal upstream resolver on loopback (UDP + TCP): answers example.test, truncates big.test over UDP."""

    def __init__(self) -> None:
        self.udp_queries: list[str] = []
        self.tcp_queries: list[str] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, data: bytes, *, tcp: bool) -> bytes:
        query = DNSRecord.parse(data)
        name = str(query.q.qname).rstrip(".")
        (self.tcp_queries if tcp else self.udp_queries).append(name)
        reply = query.reply()
        if name == "example.test":
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("192.0.2.10"), ttl=60))
        elif name == "big.test":
            if tcp:
                for i in range(40):
                    reply.add_answer(RR(query.q.qname, QTYPE.TXT, rdata=TXT(f"chunk-{i:02d}-" + "x" * 40)))
            else:
                reply.header.tc = 1
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        outer = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.transport.sendto(outer.answer(data, tcp=False), addr)

        self._udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=(LOOPBACK, 0))
        self.port = self._udp.get_extra_info("sockname")[1]

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            reply = self.answer(await reader.readexactly(size), tcp=True)
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
            writer.close()

        self._tcp = await asyncio.start_server(serve, LOOPBACK, self.port)

    async def stop(self) -> None:
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()
            await self._tcp.wait_closed()


async def ask(port: int, name: str, qtype: str = "A", *, tcp: bool = False, timeout: float = 3) -> DNSRecord:
    """One real query from a blocking client (dnslib's), run off the event loop."""
    query = DNSRecord.question(name, qtype)
    raw = await asyncio.to_thread(query.send, LOOPBACK, port, tcp=tcp, timeout=timeout)
    return DNSRecord.parse(raw)


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


Body = Callable[[DnsServer, FakeUpstream], Awaitable[None]]


def with_servers(body: Body, **server_args: Any) -> None:
    """Run `body` against a started DnsServer (forwarding to a started FakeUpstream) and stop both."""

    async def main() -> None:
        upstream = FakeUpstream()
        await upstream.start()
        server_args.setdefault("upstreams", [Upstream(LOOPBACK, upstream.port)])
        server = DnsServer(LOOPBACK, 0, records={"alpha": "172.30.77.2"}, **server_args)
        await server.start()
        try:
            await body(server, upstream)
        finally:
            await server.stop()
            await upstream.stop()

    asyncio.run(main())


def test_local_names() -> None:
    async def body(server: DnsServer, upstream: FakeUpstream) -> None:
        reply = await ask(server.port, "alpha.vm")
        assert reply.header.rcode == RCODE.NOERROR and reply.header.aa
        assert addresses(reply) == ["172.30.77.2"]
        assert addresses(await ask(server.port, "ALPHA.Vm.")) == ["172.30.77.2"]
        assert (await ask(server.port, "nope.vm")).header.rcode == RCODE.NXDOMAIN
        assert (await ask(server.port, "x.alpha.vm")).header.rcode == RCODE.NXDOMAIN
        aaaa = await ask(server.port, "alpha.vm", "AAAA")
        assert aaaa.header.rcode == RCODE.NOERROR and aaaa.rr == []
        apex = await ask(server.port, "vm")
        assert apex.header.rcode == RCODE.NOERROR and apex.rr == []
        assert addresses(await ask(server.port, "alpha.vm", tcp=True)) == ["172.30.77.2"]
        assert upstream.udp_queries == [] and upstream.tcp_queries == [], "local names must never be forwarded"

    with_servers(body)


def test_reverse_lookup_of_vm_address() -> None:
    async def body(server: DnsServer, upstream: FakeUpstream) -> None:
        reply = await ask(server.port, "2.77.30.172.in-addr.arpa", "PTR")
        assert [str(rr.rdata) for rr in reply.rr] == ["alpha.vm."]
        assert upstream.udp_queries == []
        other = await ask(server.port, "9.77.30.172.in-addr.arpa", "PTR")  # no VM there: upstream decides
        assert other.header.rcode == RCODE.NXDOMAIN
        assert upstream.udp_queries == ["9.77.30.172.in-addr.arpa"]

    with_servers(body)


def test_live_updates() -> None:
    async def body(server: DnsServer, upstream: FakeUpstream) -> None:
        server.set_record("beta", "172.30.77.3")
        assert addresses(await ask(server.port, "beta.vm")) == ["172.30.77.3"]
        server.set_record("beta", "172.30.77.9")  # e.g. re-created VM
        assert addresses(await ask(server.port, "beta.vm")) == ["172.30.77.9"]
        server.remove_record("beta")
        assert (await ask(server.port, "beta.vm")).header.rcode == RCODE.NXDOMAIN
        server.set_records({"gamma": "172.30.77.4"})  # rename alpha -> gamma, wholesale
        assert (await ask(server.port, "alpha.vm")).header.rcode == RCODE.NXDOMAIN
        assert addresses(await ask(server.port, "gamma.vm")) == ["172.30.77.4"]
        assert server.records == {"gamma": IPv4Address("172.30.77.4")}

    with_servers(body)


def test_custom_domain() -> None:
    async def body(server: DnsServer, upstream: FakeUpstream) -> None:
        assert addresses(await ask(server.port, "alpha.banger.internal")) == ["172.30.77.2"]
        assert (await ask(server.port, "alpha.vm")).header.rcode == RCODE.NXDOMAIN  # forwarded, upstream says no
        assert upstream.udp_queries == ["alpha.vm"]

    with_servers(body, domain="banger.internal.")


def test_forwarding() -> None:
    async def body(server: DnsServer, upstream: FakeUpstream) -> None:
        reply = await ask(server.port, "example.test")
        assert addresses(reply) == ["192.0.2.10"]
        assert (await ask(server.port, "missing.test")).header.rcode == RCODE.NXDOMAIN
        assert upstream.udp_queries == ["example.test", "missing.test"]

    with_servers(body)


def test_truncation_and_tcp_fallback() -> None:
    async def body(server: DnsServer, upstream: FakeUpstream) -> None:
        over_udp = await ask(server.port, "big.test", "TXT")
        assert over_udp.header.tc, "a truncated upstream answer reaches UDP clients as truncated"
        over_tcp = await ask(server.port, "big.test", "TXT", tcp=True)
        assert not over_tcp.header.tc
        assert len(over_tcp.rr) == 40
        assert upstream.tcp_queries == ["big.test"]

    with_servers(body)


def test_dead_upstream_falls_over_then_servfail() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound but never answers: forces the timeout path
    silent.bind((LOOPBACK, 0))
    try:
        dead = Upstream(LOOPBACK, silent.getsockname()[1])

        async def body(server: DnsServer, upstream: FakeUpstream) -> None:
            server.upstreams = [dead, Upstream(LOOPBACK, upstream.port)]
            assert addresses(await ask(server.port, "example.test")) == ["192.0.2.10"]
            server.upstreams = [dead]
            assert (await ask(server.port, "example.test")).header.rcode == RCODE.SERVFAIL
            server.upstreams = []
            assert (await ask(server.port, "example.test")).header.rcode == RCODE.SERVFAIL

        with_servers(body, timeout=0.3)
    finally:
        silent.close()


def test_garbage_is_ignored_and_server_survives() -> None:
    async def body(server: DnsServer, upstream: FakeUpstream) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            await loop.sock_sendto(sock, b"\x00\x01garbage", (LOOPBACK, server.port))
            await loop.sock_sendto(sock, b"", (LOOPBACK, server.port))
        finally:
            sock.close()
        assert addresses(await ask(server.port, "alpha.vm")) == ["172.30.77.2"]

    with_servers(body)


def test_stop_releases_the_port() -> None:
    async def main() -> None:
        server = DnsServer(LOOPBACK, 0)
        await server.start()
        port = server.port
        await server.stop()
        again = DnsServer(LOOPBACK, port)
        await again.start()  # would raise if the first server still held UDP or TCP
        await again.stop()

    asyncio.run(main())


def test_upstream_resolvers(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolved = tmp_path / "resolved.conf"
    resolv.write_text(
        "# generated\nsearch example.org\nnameserver 10.0.0.1\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\n"
    )
    assert upstream_resolvers(resolv, resolved) == ["10.0.0.1", "fe80::1%eth0"]

    resolv.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    resolved.write_text("nameserver 192.0.2.53 # from DHCP\nnameserver 192.0.2.54\nnameserver bogus\n")
    assert upstream_resolvers(resolv, resolved) == ["192.0.2.53", "192.0.2.54"]
    assert upstream_resolvers(resolv, tmp_path / "absent") == []
    assert upstream_resolvers(tmp_path / "absent", resolved) == []


def test_resolved_helpers(tmp_path: Path) -> None:
    argv = systemd_resolved_setup("banger0", "172.30.77.1", "vm")
    assert argv == [
        ["resolvectl", "dns", "banger0", "172.30.77.1"],
        ["resolvectl", "domain", "banger0", "~vm"],
        ["resolvectl", "default-route", "banger0", "false"],
    ]
    sock = tmp_path / "io.systemd.Resolve"
    assert resolved_running(sock) is False
    sock.touch()
    assert resolved_running(sock) is True


@pytest.mark.parametrize("bad", ["alpha.vm.", "ALPHA.VM"])
def test_names_normalized_on_insert(bad: str) -> None:
    server = DnsServer(LOOPBACK, 0, records={bad: "172.30.77.2"})
    assert list(server.records) == ["alpha"]
    with pytest.raises(InvalidInputError):
        server.set_record("beta", "172.30.77.300")
    assert list(server.records) == ["alpha"]


# Runs a DnsServer inside a namespace: argv = bind address, domain, comma-separated name=ip records, upstream.
SERVE_IN_NETNS = """
import asyncio, sys
from banger.errors import InvalidInputError
from banger.net.dns import DnsServer

async def main() -> None:
    records = dict(item.split("=") for item in sys.argv[3].split(",") if item)
    upstreams = [sys.argv[4]] if len(sys.argv) > 4 else []
    server = DnsServer(sys.argv[1], 53, domain=sys.argv[2], records=records, upstreams=upstreams)
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

QUERY = """
import sys
from dnslib import DNSRecord
reply = DNSRecord.parse(DNSRecord.question(sys.argv[2]).send(sys.argv[1], 53, timeout=3))
print(reply.header.rcode, *sorted(str(rr.rdata) for rr in reply.rr))
"""


@pytest.mark.net
def test_guest_resolves_through_bridge_address(netns: Namespaces) -> None:
    # The production layout: server on the bridge address, port 53, in the "host" namespace; its upstream
    # (another DnsServer, authoritative for `test`) sits in the "outside" namespace behind the uplink.
    outside, host, guest = netns.topology()
    upstream = netns.spawn_python(outside, SERVE_IN_NETNS, UPLINK_OUTSIDE, "test", "example=192.0.2.10")
    assert netns.wait_line(upstream) == "ready"
    server = netns.spawn_python(host, SERVE_IN_NETNS, "172.30.77.1", "vm", f"alpha={GUEST_IP}", UPLINK_OUTSIDE)
    assert netns.wait_line(server) == "ready"

    assert netns.python(guest, QUERY, "172.30.77.1", "alpha.vm").split() == ["0", GUEST_IP]
    assert netns.python(guest, QUERY, "172.30.77.1", "nope.vm").split() == [str(RCODE.NXDOMAIN)]
    assert netns.python(guest, QUERY, "172.30.77.1", "example.test").split() == ["0", "192.0.2.10"]
