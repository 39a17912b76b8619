"""Guests' DNS: answers `<vm>.<domain>` from a live table and forwards everything else to the host's resolvers.

Reverse (PTR) lookups of VM addresses are answered locally too; other reverse names are forwarded.
The server listens on UDP and TCP at one address (the bridge address, port 53, in production). A truncated
upstream answer is passed back to a UDP client as is (it retries over TCP, as resolvers do); queries arriving
over TCP are forwarded over UDP first and retried over TCP when the upstream answer is truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any, Protocol, cast

from dnslib import OPCODE, PTR, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from banger.errors import InvalidInputError, ToolError

log = logging.getLogger("banger.net.dns")

DEFAULT_DOMAIN = "vm"
RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_CONF = Path("/run/systemd/resolve/resolv.conf")
RESOLVED_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")
_STUBS = {"127.0.0.53", "127.0.0.54"}  # systemd-resolved's local stub listeners
_MAX_INFLIGHT = 512


@dataclass(frozen=True)
class Upstream:
    """One upstream resolver."""

    host: str
    port: int = 53


def _nameservers(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            address, _, zone = fields[1].partition("%")
            with contextlib.suppress(ValueError):
                # Keep an IPv6 zone (fe80::1%eth0): a link-local server is unreachable without it.
                found.append(str(ip_address(address)) + (f"%{zone}" if zone else ""))
    return found


def upstream_resolvers(resolv_conf: Path = RESOLV_CONF, resolved_conf: Path = RESOLVED_CONF) -> list[str]:
    """The host's real resolvers: resolv.conf's nameservers, looking past systemd-resolved's local stub."""
    servers = _nameservers(resolv_conf)
    if any(s in _STUBS for s in servers):
        # Go straight to resolved's own upstreams: guest lookups then do not depend on resolved's per-link
        # routing, which (after `setup-host`) sends ~vm back to us.
        servers = [s for s in servers if s not in _STUBS] + _nameservers(resolved_conf)
    unique: list[str] = []
    for s in servers:
        if s not in unique and s not in _STUBS:
            unique.append(s)
    return unique


def resolved_running(socket: Path = RESOLVED_SOCKET) -> bool:
    """Whether systemd-resolved is running on this host (its varlink socket exists)."""
    return socket.exists()


def systemd_resolved_setup(bridge: str, address: str, domain: str = DEFAULT_DOMAIN) -> list[list[str]]:
    """Commands that route `*.domain` lookups on the host to banger's DNS server via the bridge link."""
    resolvectl = "resolvectl"  # resolved via PATH by proc.run; resolved_running() tells whether to bother
    return [
        [resolvectl, "dns", bridge, address],
        # `~domain` makes it a routing-only domain: only names under it go to this link's server.
        [resolvectl, "domain", bridge, f"~{domain}"],
        [resolvectl, "default-route", bridge, "false"],
    ]


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _address(value: IPv4Address | str) -> IPv4Address:
    try:
        return IPv4Address(str(value))
    except ValueError as exc:
        raise InvalidInputError(f"not an IPv4 address for a DNS record: {value!r}") from exc


class NameGuard(Protocol):
    """What the DNS server asks about egress policy (implemented by net/guard.py's Guard)."""

    def may_resolve(self, client: str | None, qname: str) -> bool:
        """Whether to forward this name for this client."""
        ...

    def learn(self, client: str | None, addresses: Sequence[IPv4Address]) -> None:
        """Record the addresses an allowed name resolved to, for this client."""
        ...


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        self.server._spawn(self._answer(data, addr))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    async def _answer(self, data: bytes, addr: tuple[str | int, int]) -> None:
        reply = await self.server.handle(data, tcp=False, client=str(addr[0]))
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self.query_id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        # Ignore anything that is not the answer to our query id (stray or spoofed packets).
        if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == self.query_id and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


class DnsServer:
    """A small authoritative-for-one-domain, forwarding-for-the-rest DNS server on UDP and TCP."""

    def __init__(
        self,
        host: str,
        port: int = 53,
        *,
        domain: str = DEFAULT_DOMAIN,
        records: Mapping[str, IPv4Address | str] | None = None,
        upstreams: Sequence[str | Upstream] = (),
        timeout: float = 2.0,
        ttl: int = 5,
    ) -> None:
        self.host = host
        self.port = port
        self.domain = _normalize(domain)
        self.upstreams = [u if isinstance(u, Upstream) else Upstream(u) for u in upstreams]
        self.timeout = timeout
        self.ttl = ttl
        self._records: dict[str, IPv4Address] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_proto: _UdpProtocol | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.set_records(records or {})
        # Egress policy (net/guard.py): which client may resolve which outside name; what it resolved to.
        self.guard: NameGuard | None = None

    # -- records -------------------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        key = _normalize(name)
        return key.removesuffix("." + self.domain)  # "alpha" and "alpha.vm" name the same VM

    def set_records(self, mapping: Mapping[str, IPv4Address | str]) -> None:
        """Replace the whole name -> address table; takes effect for the next query."""
        self._records = {self._key(k): _address(v) for k, v in mapping.items()}

    def set_record(self, name: str, address: IPv4Address | str) -> None:
        """Add or change one VM's address."""
        self._records = {**self._records, self._key(name): _address(address)}

    def remove_record(self, name: str) -> None:
        """Forget one VM's name (unknown names are ignored)."""
        key = self._key(name)
        self._records = {k: v for k, v in self._records.items() if k != key}

    @property
    def records(self) -> dict[str, IPv4Address]:
        """A copy of the current table."""
        return dict(self._records)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the UDP and TCP sockets (same port; port 0 picks a free one) and start answering."""
        loop = asyncio.get_running_loop()
        for _attempt in range(5):
            try:
                udp, proto = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
                )
            except OSError as exc:
                raise ToolError(f"cannot listen for DNS on udp {self.host}:{self.port}: {exc}") from exc
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port, reuse_address=True)
            except OSError as exc:
                udp.close()
                if self.port == 0:
                    continue  # the kernel's free UDP port was taken for TCP; pick another
                raise ToolError(f"cannot listen for DNS on tcp {self.host}:{port}: {exc}") from exc
            self._udp, self._udp_proto = udp, proto
            self.port = port
            log.debug("dns: listening on %s:%d for *.%s", self.host, port, self.domain)
            return
        raise ToolError(f"cannot find a free port for DNS on {self.host}")

    async def stop(self) -> None:
        """Close the sockets and cancel queries in flight."""
        if self._udp is not None and self._udp_proto is not None:
            self._udp.close()
            # The transport releases its socket on a later loop turn; wait so the port is free when we return.
            await self._udp_proto.closed
            self._udp = self._udp_proto = None
        server, self._tcp = self._tcp, None
        if server is not None:
            server.close()
        # Cancel before waiting on the server: from Python 3.12 wait_closed() waits for open connections.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= _MAX_INFLIGHT:
            log.warning("dns: too many queries in flight, dropping one")
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- answering -----------------------------------------------------------------------------------------

    async def handle(self, data: bytes, *, tcp: bool, client: str | None = None) -> bytes | None:
        """The reply to one wire-format query, or None to stay silent (unparseable input)."""
        try:
            query = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError):
            return None
        if query.header.qr or not query.questions:
            return None
        if query.header.opcode != OPCODE.QUERY:
            reply = query.reply(ra=1)
            reply.header.rcode = RCODE.NOTIMP
            return bytes(reply.pack())
        qname = _normalize(str(query.q.qname))
        if qname == self.domain or qname.endswith("." + self.domain):
            return bytes(self._answer_local(query, qname).pack())
        if query.q.qtype == QTYPE.PTR and (name := self._reverse(qname)) is not None:
            reply = query.reply(aa=1, ra=1)
            reply.add_answer(RR(query.q.qname, QTYPE.PTR, rdata=PTR(f"{name}.{self.domain}."), ttl=self.ttl))
            return bytes(reply.pack())
        if self.guard is None:
            return await self._forward(query, data, tcp=tcp)
        if not self.guard.may_resolve(client, qname):
            reply = query.reply(ra=1)
            reply.header.rcode = RCODE.REFUSED
            return bytes(reply.pack())
        answer = await self._forward(query, data, tcp=tcp)
        await self._learn(client, answer)
        return answer

    async def _learn(self, client: str | None, answer: bytes) -> None:
        """Hand the A records of an allowed answer to the guard before the client sees them."""
        assert self.guard is not None
        try:
            addresses = [IPv4Address(str(rr.rdata)) for rr in DNSRecord.parse(answer).rr if rr.rtype == QTYPE.A]
        except (DNSError, struct.error, IndexError, ValueError):
            return
        if addresses:
            try:
                await asyncio.to_thread(self.guard.learn, client, addresses)
            except Exception as exc:  # the guest then just cannot connect: say why in the log
                log.warning("dns: could not allow %s for %s: %s", addresses, client, exc)

    def _reverse(self, qname: str) -> str | None:
        """The VM name owning the address in a `d.c.b.a.in-addr.arpa` name, if any."""
        octets = qname.removesuffix(".in-addr.arpa").split(".")
        if len(octets) != 4 or not qname.endswith(".in-addr.arpa"):
            return None
        try:
            address = IPv4Address(".".join(reversed(octets)))
        except ValueError:
            return None
        return next((name for name, ip in self._records.items() if ip == address), None)

    def _answer_local(self, query: DNSRecord, qname: str) -> DNSRecord:
        reply = query.reply(aa=1, ra=1)
        if qname == self.domain:
            return reply  # the domain itself exists but has no addresses: NOERROR, no data
        address = self._records.get(qname[: -len(self.domain) - 1])
        if address is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif query.q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(str(address)), ttl=self.ttl))
        return reply

    async def _forward(self, query: DNSRecord, data: bytes, *, tcp: bool) -> bytes:
        for upstream in self.upstreams:
            try:
                answer = await self._ask_udp(upstream, data, query.header.id)
                if tcp and DNSRecord.parse(answer).header.tc:
                    answer = await self._ask_tcp(upstream, data)
                return answer
            except (OSError, TimeoutError, asyncio.IncompleteReadError, DNSError) as exc:
                log.debug("dns: upstream %s:%d failed for %s: %r", upstream.host, upstream.port, query.q.qname, exc)
        reply = query.reply(ra=1)
        reply.header.rcode = RCODE.SERVFAIL
        return bytes(reply.pack())

    async def _ask_udp(self, upstream: Upstream, data: bytes, query_id: int) -> bytes:
        loop = asyncio.get_running_loop()
        # A fresh socket per query: a random source port the answer must come back to.
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UpstreamUdp(query_id), remote_addr=(upstream.host, upstream.port)
        )
        try:
            transport.sendto(data)
            async with asyncio.timeout(self.timeout):
                return await proto.reply
        finally:
            transport.close()

    async def _ask_tcp(self, upstream: Upstream, data: bytes) -> bytes:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
            try:
                writer.write(struct.pack("!H", len(data)) + data)
                await writer.drain()
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(size)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = cast("asyncio.Task[None] | None", asyncio.current_task())
        if task is not None:
            self._tasks.add(task)
        peer = str((writer.get_extra_info("peername") or ("",))[0]) or None
        try:
            while True:
                async with asyncio.timeout(30):  # idle clients do not get to hold a connection forever
                    header = await reader.readexactly(2)
                    data = await reader.readexactly(struct.unpack("!H", header)[0])
                reply = await self.handle(data, tcp=True, client=peer)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # client went away or idled out: closing below is all there is to do
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
