"""Published ports: the `forwards` table and the daemon's listeners that relay each connection through a tunnel.

`--publish [ADDR:]HOST:GUEST`: the daemon listens on ADDR:HOST (127.0.0.1 unless told otherwise; 0.0.0.0 covers
loopback too) while the VM runs, and joins every connection to guest 127.0.0.1:GUEST through the agent, so it
works on loopback and with `--net none`. For a bridged VM, an explicit non-loopback ADDR is also DNAT'ed by
banger's nft table (net/service.py reads the rows), which carries outside traffic without the agent in the way; the
daemon's listener still holds the port, so nothing else can take it while the VM runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from banger.errors import InUseError, InvalidInputError
from banger.guest.tunnelclient import Tunnel
from banger.store.db import Store
from banger.tunnels.relay import relay

log = logging.getLogger("banger.tunnels")

LOOPBACK = "127.0.0.1"
# Opens a tunnel to a guest port of the VM (the agent connection is found or re-made by the caller).
TunnelOpener = Callable[[int], Awaitable[Tunnel]]


@dataclass(frozen=True)
class Publish:
    """One published port: host ADDR:HOST_PORT -> guest 127.0.0.1:GUEST_PORT."""

    address: str
    host_port: int
    guest_port: int

    def to_json(self) -> dict[str, Any]:
        """The `publish` entries of `vm show --json`."""
        return {"address": self.address, "host_port": self.host_port, "guest_port": self.guest_port, "proto": "tcp"}

    @property
    def loopback_only(self) -> bool:
        """Reachable from this host only."""
        return ipaddress.IPv4Address(self.address).is_loopback

    def __str__(self) -> str:
        return f"{self.address}:{self.host_port}:{self.guest_port}"


def _port(text: str, spec: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise InvalidInputError(f"bad port {text!r} in {spec!r}: use [ADDR:]HOST:GUEST, e.g. 8080:80") from None
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"bad port {port} in {spec!r}: ports are 1-65535")
    return port


def parse_publish(spec: str) -> Publish:
    """'8080:80', '0.0.0.0:8080:80', '192.0.2.7:8080:80', or '8080' (the same port on both sides)."""
    parts = spec.strip().split(":")
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) == 2:
        parts = [LOOPBACK, *parts]
    if len(parts) != 3:
        raise InvalidInputError(f"bad publish spec {spec!r}: use [ADDR:]HOST:GUEST with an IPv4 ADDR")
    try:
        address = str(ipaddress.IPv4Address(parts[0]))
    except ValueError:
        raise InvalidInputError(f"bad address {parts[0]!r} in {spec!r}: give an IPv4 address such as 0.0.0.0") from None
    return Publish(address, _port(parts[1], spec), _port(parts[2], spec))


def check_bindable(pub: Publish) -> None:
    """Raise InUseError if ADDR:HOST cannot be listened on now (taken, or not an address of this host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((pub.address, pub.host_port))
            sock.listen(1)
        except OSError as exc:
            raise _bind_error(pub, exc) from exc


def _bind_error(pub: Publish, exc: OSError) -> InUseError | InvalidInputError:
    if exc.errno == errno.EADDRINUSE:
        return InUseError(
            f"host port {pub.address}:{pub.host_port} is already in use",
            hint="pick another host port, e.g. --publish 18080:" + str(pub.guest_port),
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return InvalidInputError(f"{pub.address} is not an address of this host")
    return InvalidInputError(f"cannot listen on {pub.address}:{pub.host_port}: {exc.strerror}")


class PortListener:
    """A daemon-side listener for one published (or automatically forwarded) port of a running VM."""

    def __init__(self, address: str, host_port: int, guest_port: int, opener: TunnelOpener) -> None:
        self.address, self.host_port, self.guest_port = address, host_port, guest_port
        self._opener = opener
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and serve; InUseError when the port is taken."""
        try:
            self._server = await asyncio.start_server(self._serve, self.address, self.host_port, reuse_address=True)
        except OSError as exc:
            raise _bind_error(Publish(self.address, self.host_port, self.guest_port), exc) from exc

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            tunnel = await self._opener(self.guest_port)
        except Exception as exc:
            log.info("port %s:%d: %s", self.address, self.host_port, exc)
            writer.close()  # the client sees the connection closed, as if nothing listened in the guest
            self._conns.discard(task)
            return
        try:
            await relay(tunnel, reader, writer)
        finally:
            self._conns.discard(task)

    async def stop(self) -> None:
        """Stop listening and cut the connections in flight."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PublishTable:
    """The `forwards` table: a VM's published ports, kept across restarts of the VM and of the daemon."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def of(self, vm_id: str) -> list[Publish]:
        """The VM's published ports, by host port."""
        rows = self.store.query(
            "SELECT address, host_port, guest_port FROM forwards WHERE vm_id=? ORDER BY host_port", (vm_id,)
        )
        return [Publish(r["address"], r["host_port"], r["guest_port"]) for r in rows]

    def owner_of(self, host_port: int) -> str | None:
        """Name of the VM that publishes `host_port`, if any."""
        row = self.store.one(
            "SELECT v.name FROM forwards f JOIN vms v ON v.id = f.vm_id WHERE f.proto='tcp' AND f.host_port=?",
            (host_port,),
        )
        return None if row is None else str(row["name"])

    def replace(self, vm_id: str, pubs: list[Publish]) -> None:
        """Make the VM's rows exactly `pubs`; refuses a host port another VM publishes."""
        hosts = [p.host_port for p in pubs]
        if len(set(hosts)) != len(hosts):
            raise InvalidInputError("a host port is listed twice")
        with self.store.transaction() as conn:
            for pub in pubs:
                other = conn.execute(
                    "SELECT v.name FROM forwards f JOIN vms v ON v.id = f.vm_id "
                    "WHERE f.proto='tcp' AND f.host_port=? AND f.vm_id != ?",
                    (pub.host_port, vm_id),
                ).fetchone()
                if other is not None:
                    raise InUseError(f"host port {pub.host_port} is already published by VM {other['name']}")
            conn.execute("DELETE FROM forwards WHERE vm_id=?", (vm_id,))
            conn.executemany(
                "INSERT INTO forwards (proto, host_port, vm_id, guest_port, created_at, address) "
                "VALUES ('tcp', ?, ?, ?, ?, ?)",
                [(p.host_port, vm_id, p.guest_port, _now(), p.address) for p in pubs],
            )
