"""The daemon's owner of guest networking: bridge, address leases, TAPs, the nft table, published ports and DNS.

Lifecycle, as the daemon drives it:
- `setup()` at daemon start: the bridge with the gateway address, net.ipv4.ip_forward=1, banger's nft table
  and the DNS server on gateway:53 (in its own thread, see dnsthread). The ip_forward value found before banger
  first changed it is kept in <home>/run/ip_forward.prev, so a restarted daemon still restores the right one.
  When the host cannot do this (not root, no nft, a bad `subnet`), the service stays `available=False` with a
  reason; the daemon runs on and VMs asking for a network get that reason as an error.
- `allocate()`/`release()` when a VM with a network is created/removed; `plug()`/`unplug()` when it
  starts/stops; `set_forwards()` at any time (published ports are in the nft table only while plugged).
- `reconcile(running)` after the daemon (re)starts: TAPs of VMs that are not running are removed, those of
  running VMs are re-attached to the bridge (after the bridge was recreated, say) and the table is rewritten.
  A TAP deleted under a running VMM cannot be given back to it; recreating it serves the VM's next start.
- `shutdown()` when the daemon exits stops only the DNS server. VMM processes outlive the daemon, so their
  TAPs, the bridge, the nft table (NAT, published ports) and ip_forward stay: running guests keep their
  connectivity, and only lookups through the gateway fail until the daemon is back.
- `teardown()` removes all banger added (TAPs, nft table, bridge) and restores ip_forward; it refuses while
  a VM is plugged, unless forced.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from banger import proc
from banger.aio import in_thread
from banger.config import Settings
from banger.errors import (
    BangerError,
    BusyError,
    InUseError,
    InvalidInputError,
    NotFoundError,
    ToolError,
    UnsupportedError,
)
from banger.fsutil import atomic_write
from banger.net import guard, ipam, nft
from banger.net.dns import DnsServer, resolved_running, systemd_resolved_setup, upstream_resolvers
from banger.net.dnsthread import DnsThread
from banger.net.guestnet import GuestNet
from banger.net.hostinfo import bridge_state, host_instructions, ip_forward, listening_tcp_ports, run_all
from banger.net.links import BridgeConfig, Links, guest_mac, tap_mac, tap_name
from banger.net.nft import NatState, PortForward, Proto
from banger.net.policy import NetPolicy
from banger.store.db import Store

log = logging.getLogger("banger.net")

_LEASE_ATTEMPTS = 5
_PREV_FORWARD = "ip_forward.prev"
_HOST_SETUP_MARK = "network-host-setup"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInputError(f"port {port!r} is not a number in 1-65535")
    return port


class NetworkService:
    """Guest networking on this host (or inside `netns`, for tests); see the module docstring for its lifecycle."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        netns: str | None = None,
        dns_port: int = 53,
        upstreams: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.netns = netns
        self.dns_port = dns_port
        self.domain = str(settings.get("dns_domain"))
        self.available = False
        self.reason: str | None = "network setup has not run yet"
        self.dns_error: str | None = None
        try:
            self.config = BridgeConfig(str(settings.get("bridge")), IPv4Network(str(settings.get("subnet"))))
        except (BangerError, ValueError) as exc:
            self.config = BridgeConfig()
            self.reason = f"invalid network configuration: {exc}"
            self._bad_config: str | None = self.reason
        else:
            self._bad_config = None
        self._upstreams = list(upstreams) if upstreams is not None else None
        self._dns: DnsThread | None = None
        self._plugged: set[str] = set()
        self._applied: NatState | None = None
        # Kernel-side changes (TAPs, nft table) come from the loop and from worker threads: one at a time.
        self._lock = threading.RLock()
        # Filters that keep guests in their lane (net/guard.py); the App points policy_of at the policy table.
        self.guard = guard.Guard(netns)
        self.policy_of: Callable[[str], NetPolicy] = lambda vm_id: NetPolicy()

    @property
    def subnet(self) -> IPv4Network:
        """The guests' subnet."""
        return self.config.subnet

    @property
    def gateway(self) -> IPv4Address:
        """The bridge's address: the guests' gateway and DNS server."""
        return self.config.gateway

    def _run_file(self, name: str) -> Path:
        return self.settings.paths.run_dir / name

    def require(self) -> None:
        if not self.available:
            raise UnsupportedError(
                f"guest networking is unavailable: {self.reason}",
                hint="see `banger network status`, or create the VM without a network",
            )

    # -- setup and shutdown ----------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Bridge, ip_forward, nft table and DNS; on a host that cannot do it, record why and carry on."""
        if self._dns is not None:
            return  # already set up in this process
        try:
            await in_thread(self._setup_kernel)
        except (BangerError, OSError) as exc:
            self.available, self.reason = False, str(exc)
            log.warning("network: guest networking unavailable: %s", exc)
            return
        self.available, self.reason = True, None
        await self._start_dns()
        await in_thread(self._reapply_host_setup)

    def _setup_kernel(self) -> None:
        if self._bad_config is not None:
            raise InvalidInputError(self._bad_config)
        if os.geteuid() != 0:
            raise UnsupportedError("bangerd is not running as root (bridge, TAPs and NAT need it)")
        for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("sysctl", "procps")):
            proc.which(tool, hint=f"install the {package} package")
        with self._lock:
            with Links(self.netns) as links:
                links.ensure_bridge(self.config)
                present = {t.name for t in links.list_taps()}
            guard.disable_ipv6(self.config.name, netns=self.netns)
            previous = nft.enable_forwarding(netns=self.netns)
            marker = self._run_file(_PREV_FORWARD)
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(marker, previous.encode())
            # Until reconcile() says which VMs run, a leased VM whose TAP survived the last daemon counts as plugged,
            # so its published ports do not blink out across the restart.
            self._plugged = {vm_id for vm_id in self._leases() if tap_name(vm_id) in present}
            self._apply(force=True)

    async def _start_dns(self) -> None:
        upstreams = self._upstreams if self._upstreams is not None else upstream_resolvers()
        server = DnsServer(
            str(self.gateway), self.dns_port, domain=self.domain, records=self.records(), upstreams=upstreams
        )
        server.guard = self.guard
        dns = DnsThread(server, self.netns)
        try:
            await dns.start()
        except (BangerError, OSError) as exc:
            # Guests still reach each other and the world by address; only names are missing.
            self.dns_error = str(exc)
            log.warning("network: DNS server not started: %s", exc)
            return
        self._dns, self.dns_error = dns, None

    async def shutdown(self) -> None:
        """Stop the DNS server; everything running guests need stays (see the module docstring)."""
        dns, self._dns = self._dns, None
        if dns is not None:
            await dns.stop()

    async def teardown(self, *, force: bool = False) -> dict[str, Any]:
        """Remove TAPs, nft table and bridge and restore ip_forward; refused while a VM is plugged unless forced."""
        if self._plugged and not force:
            raise InUseError(f"{len(self._plugged)} VM(s) still use the network", hint="stop them first")
        await self.shutdown()
        result = await in_thread(self._teardown_kernel)
        self.available, self.reason = False, "network torn down"
        return result

    def _teardown_kernel(self) -> dict[str, Any]:
        errors: list[str] = []
        removed: list[str] = []
        with self._lock:
            self._plugged.clear()
            self._applied = None
            try:
                with Links(self.netns) as links:
                    removed = links.prune_taps(set())
                    links.remove_bridge(self.config.name)
            except BangerError as exc:
                errors.append(str(exc))
            try:
                nft.remove_table(netns=self.netns)
                self.guard.remove()
            except BangerError as exc:
                errors.append(str(exc))
            marker = self._run_file(_PREV_FORWARD)
            if marker.exists():
                try:
                    nft.restore_forwarding(marker.read_text().strip(), netns=self.netns)
                    marker.unlink()
                except BangerError as exc:
                    errors.append(str(exc))
        if errors:
            raise ToolError("network teardown incomplete: " + "; ".join(errors))
        return {"removed_taps": removed, "bridge": self.config.name}

    # -- leases and DNS --------------------------------------------------------------------------------------

    def _leases(self) -> dict[str, IPv4Address]:
        return {r["vm_id"]: IPv4Address(r["ip"]) for r in self.store.query("SELECT vm_id, ip FROM ip_leases")}

    def lease(self, vm_id: str) -> IPv4Address | None:
        """The VM's address, or None when it has no network."""
        row = self.store.one("SELECT ip FROM ip_leases WHERE vm_id=?", (vm_id,))
        return IPv4Address(row["ip"]) if row else None

    def allocate(self, vm_id: str, name: str) -> IPv4Address:
        """Lease the lowest free address to a VM (its existing lease if it has one) and publish name -> ip in DNS."""
        self.require()
        for _attempt in range(_LEASE_ATTEMPTS):
            try:
                address = self._insert_lease(vm_id)
                break
            except sqlite3.IntegrityError:
                # Another writer of the same database took the address between our read and insert: try again.
                continue
        else:
            raise BusyError(f"could not lease an address for VM {name} after {_LEASE_ATTEMPTS} attempts")
        self._push_dns({vm_id: name})
        log.info("network: leased %s to %s", address, name)
        return address

    def _insert_lease(self, vm_id: str) -> IPv4Address:
        with self.store.transaction() as conn:
            if conn.execute("SELECT 1 FROM vms WHERE id=?", (vm_id,)).fetchone() is None:
                raise NotFoundError(f"no VM with id {vm_id!r}")
            row = conn.execute("SELECT ip FROM ip_leases WHERE vm_id=?", (vm_id,)).fetchone()
            if row is not None:
                return IPv4Address(row["ip"])
            taken = {IPv4Address(r["ip"]) for r in conn.execute("SELECT ip FROM ip_leases")}
            address = ipam.allocate(self.subnet, taken)
            conn.execute(
                "INSERT INTO ip_leases (ip, vm_id, created_at) VALUES (?, ?, ?)", (str(address), vm_id, _now())
            )
            return address

    async def release(self, vm_id: str) -> None:
        """Drop the VM's lease, DNS name, published ports and TAP (safe to call twice, or without a lease)."""
        # pyroute2's synchronous IPRoute cannot be opened on a thread running an event loop.
        await in_thread(self._release_sync, vm_id)
        self._push_dns()

    def _release_sync(self, vm_id: str) -> None:
        with self._lock:
            with self.store.transaction() as conn:
                conn.execute("DELETE FROM forwards WHERE vm_id=?", (vm_id,))
                conn.execute("DELETE FROM ip_leases WHERE vm_id=?", (vm_id,))
            self._plugged.discard(vm_id)
            if self.available:
                with Links(self.netns) as links:
                    links.remove_tap(tap_name(vm_id))
                self._apply()

    def rename(self, vm_id: str, new_name: str) -> None:
        """Serve the VM's address under its new name (call before or after the vms row changes)."""
        self._push_dns({vm_id: new_name})

    def records(self) -> dict[str, IPv4Address]:
        """DNS names (VM names) of every VM holding a lease."""
        rows = self.store.query("SELECT v.name, l.ip FROM ip_leases l JOIN vms v ON v.id = l.vm_id")
        return {r["name"]: IPv4Address(r["ip"]) for r in rows}

    def _push_dns(self, names: dict[str, str] | None = None) -> None:
        if self._dns is None:
            return
        rows = self.store.query("SELECT v.id, v.name, l.ip FROM ip_leases l JOIN vms v ON v.id = l.vm_id")
        overrides = names or {}
        self._dns.set_records({overrides.get(r["id"], r["name"]): IPv4Address(r["ip"]) for r in rows})

    # -- TAPs ------------------------------------------------------------------------------------------------

    async def plug(self, vm_id: str) -> GuestNet:
        """Create the VM's TAP on the bridge and activate its published ports; returns its network settings."""
        self.require()
        address = self.lease(vm_id)
        if address is None:
            raise NotFoundError(f"VM {vm_id} has no network address (it was created without a network)")
        ipam.check_lease(self.subnet, address)
        tap = tap_name(vm_id)
        await in_thread(self._plug_sync, vm_id, tap)
        return GuestNet(
            tap=tap,
            guest_mac=guest_mac(vm_id),
            ip=address,
            prefix=self.subnet.prefixlen,
            gateway=self.gateway,
            nameservers=(self.gateway,),
            search=(self.domain,),
        )

    def _plug_sync(self, vm_id: str, tap: str) -> None:
        with self._lock, Links(self.netns) as links:
            links.ensure_tap(tap, tap_mac(vm_id), self.config.name)
            self._plugged.add(vm_id)
            try:
                self._apply()
            except BaseException:
                self._plugged.discard(vm_id)
                links.remove_tap(tap)
                raise

    async def unplug(self, vm_id: str) -> None:
        """Remove the VM's TAP and take its published ports out of the nft table."""
        await in_thread(self._unplug_sync, vm_id)

    def _unplug_sync(self, vm_id: str) -> None:
        with self._lock:
            self._plugged.discard(vm_id)
            if not self.available:
                return
            with Links(self.netns) as links:
                links.remove_tap(tap_name(vm_id))
            self._apply()

    async def reconcile(self, running_vm_ids: set[str]) -> dict[str, list[str]]:
        """After a daemon restart: drop TAPs of VMs not running, repair those of running ones, rewrite the table."""
        if not self.available:
            return {"removed_taps": [], "repaired_taps": []}
        result = await in_thread(self._reconcile_sync, set(running_vm_ids))
        self._push_dns()
        return result

    def _reconcile_sync(self, running: set[str]) -> dict[str, list[str]]:
        with self._lock:
            live = running & set(self._leases())
            with Links(self.netns) as links:
                removed = links.prune_taps({tap_name(v) for v in live})
                repaired: list[str] = []
                for vm_id in sorted(live):
                    name, mac = tap_name(vm_id), tap_mac(vm_id)
                    info = links.get_tap(name)
                    if info is None or info.master != self.config.name or not info.up or info.mac != mac:
                        links.ensure_tap(name, mac, self.config.name)
                        repaired.append(name)
            self._plugged = live
            self._apply(force=True)
        if removed or repaired:
            log.info("network: reconciled TAPs (removed %s, repaired %s)", removed, repaired)
        return {"removed_taps": removed, "repaired_taps": repaired}

    # -- published ports -------------------------------------------------------------------------------------

    def forwards(self, vm_id: str | None = None) -> list[dict[str, Any]]:
        """Published ports (of one VM, or all), with whether each is active (its VM plugged)."""
        sql = "SELECT f.*, v.name FROM forwards f JOIN vms v ON v.id = f.vm_id"
        args: tuple[str, ...] = ()
        if vm_id is not None:
            sql, args = sql + " WHERE f.vm_id = ?", (vm_id,)
        rows = self.store.query(sql + " ORDER BY f.host_port", args)
        return [
            {
                "vm": r["name"],
                "vm_id": r["vm_id"],
                "proto": r["proto"],
                "host_port": r["host_port"],
                "guest_port": r["guest_port"],
                "address": r["address"],
                "active": r["vm_id"] in self._plugged,
            }
            for r in rows
        ]

    def set_forwards(self, vm_id: str, forwards: Sequence[tuple[int, int]]) -> None:
        """Replace the VM's published TCP ports (host_port -> guest_port); applied at once if it is plugged."""
        pairs = [(_check_port(h), _check_port(g)) for h, g in forwards]
        hosts = [h for h, _ in pairs]
        if len(set(hosts)) != len(hosts):
            raise InvalidInputError("a host port is listed twice")
        # DNAT of a port a host process listens on would silently take it over (think ssh on 22): refuse.
        listening = listening_tcp_ports(self.netns) if self.available else set()
        with self._lock, self.store.transaction() as conn:
            if conn.execute("SELECT 1 FROM ip_leases WHERE vm_id=?", (vm_id,)).fetchone() is None:
                raise InvalidInputError(f"VM {vm_id} has no network, so it cannot publish ports")
            mine = {r["host_port"] for r in conn.execute("SELECT host_port FROM forwards WHERE vm_id=?", (vm_id,))}
            busy = sorted((set(hosts) & listening) - mine)
            if busy:
                raise InUseError(f"host port {busy[0]} is in use by a process on the host")
            for host_port in hosts:
                other = conn.execute(
                    "SELECT v.name FROM forwards f JOIN vms v ON v.id = f.vm_id "
                    "WHERE f.proto=? AND f.host_port=? AND f.vm_id != ?",
                    (Proto.TCP.value, host_port, vm_id),
                ).fetchone()
                if other is not None:
                    raise InUseError(f"host port {host_port} is already published by VM {other['name']}")
            conn.execute("DELETE FROM forwards WHERE vm_id=?", (vm_id,))
            conn.executemany(
                "INSERT INTO forwards (proto, host_port, vm_id, guest_port, created_at) VALUES (?, ?, ?, ?, ?)",
                [(Proto.TCP.value, h, vm_id, g, _now()) for h, g in pairs],
            )
            # Applied inside the transaction: if nft refuses, the rows roll back with it.
            if self.available and vm_id in self._plugged:
                self._apply()

    # -- nft -------------------------------------------------------------------------------------------------

    def _nat_state(self) -> NatState:
        # Loopback publishing is the daemon's own listener (tunnels/publish.py); DNAT carries only the ports
        # published on a host address, `0.0.0.0` meaning all of them.
        rows = self.store.query(
            "SELECT f.proto, f.host_port, f.guest_port, f.vm_id, f.address, l.ip FROM forwards f "
            "JOIN ip_leases l ON l.vm_id = f.vm_id ORDER BY f.host_port"
        )
        forwards = tuple(
            PortForward(
                r["host_port"],
                IPv4Address(r["ip"]),
                r["guest_port"],
                Proto(r["proto"]),
                None if r["address"] == "0.0.0.0" else IPv4Address(r["address"]),
            )
            for r in rows
            if r["vm_id"] in self._plugged
            and IPv4Address(r["ip"]) in self.subnet
            and not IPv4Address(r["address"]).is_loopback
        )
        return NatState(subnet=self.subnet, bridge=self.config.name, forwards=forwards)

    def _apply(self, *, force: bool = False) -> None:
        state = self._nat_state()
        if force or state != self._applied:
            nft.apply_ruleset(state, netns=self.netns)
            self._applied = state
        leases = self._leases()
        lanes = tuple(
            guard.Lane(v, tap_name(v), guest_mac(v), leases[v], self.policy_of(v))
            for v in sorted(self._plugged)
            if v in leases
        )
        self.guard.apply(guard.GuardState(self.config.name, self.gateway, self.subnet, lanes))

    def refresh_forwards(self) -> None:
        """Bring the nft table in line with the `forwards` table (after published ports changed)."""
        with self._lock:
            if self.available:
                self._apply()

    # -- host integration and status -------------------------------------------------------------------------

    async def setup_host(self) -> dict[str, Any]:
        """Make the host resolve *.<domain> through our DNS (systemd-resolved), or explain how to."""
        self.require()
        commands = systemd_resolved_setup(self.config.name, str(self.gateway), self.domain)
        if self.netns is not None or not resolved_running():
            return {"configured": False, "commands": [], "message": host_instructions(self.gateway, self.domain)}
        await in_thread(run_all, commands)
        await in_thread(atomic_write, self.settings.paths.home / _HOST_SETUP_MARK, b"systemd-resolved\n")
        return {
            "configured": True,
            "commands": [" ".join(argv) for argv in commands],
            "message": f"*.{self.domain} now resolves through {self.gateway} on {self.config.name}",
        }

    def _reapply_host_setup(self) -> None:
        # resolved forgets per-link DNS when the link goes away (a reboot): redo what setup-host did once.
        if self.netns is not None or not (self.settings.paths.home / _HOST_SETUP_MARK).exists():
            return
        if not resolved_running():
            return
        try:
            run_all(systemd_resolved_setup(self.config.name, str(self.gateway), self.domain))
        except BangerError as exc:
            log.warning("network: could not re-apply systemd-resolved routing: %s", exc)

    def status(self) -> dict[str, Any]:
        """Bridge, leases, table, DNS and ip_forward as they are now (blocking: call it in a thread)."""
        present: dict[str, bool] = {}
        bridge: dict[str, Any] = {"name": self.config.name, "address": str(self.config.interface), "present": False}
        table: str | None = None
        forwarding: str | None = None
        problems: list[str] = []
        if self.available or self.netns is not None or os.geteuid() == 0:
            try:
                with Links(self.netns) as links:
                    present = {t.name: t.master == self.config.name for t in links.list_taps()}
                bridge.update(bridge_state(self.config.name, self.netns))
                table = nft.read_table(netns=self.netns)
                forwarding = ip_forward(self.netns)
            except BangerError as exc:
                problems.append(str(exc))
        leases = [
            {
                "vm": r["name"],
                "vm_id": r["vm_id"],
                "ip": r["ip"],
                "tap": tap_name(r["vm_id"]),
                "tap_present": tap_name(r["vm_id"]) in present,
                "plugged": r["vm_id"] in self._plugged,
            }
            for r in self.store.query(
                "SELECT l.vm_id, l.ip, v.name FROM ip_leases l JOIN vms v ON v.id = l.vm_id ORDER BY l.ip"
            )
        ]
        dns = self._dns.server if self._dns is not None and self._dns.running else None
        return {
            "available": self.available,
            "reason": self.reason,
            "problems": problems,
            "subnet": str(self.subnet),
            "bridge": bridge,
            "ip_forward": forwarding,
            "leases": leases,
            "forwards": self.forwards(),
            "nft_table": table,
            "dns": {
                "listening": f"{dns.host}:{dns.port}" if dns else None,
                "domain": self.domain,
                "upstreams": [u.host for u in dns.upstreams] if dns else [],
                "records": len(dns.records) if dns else 0,
                "error": self.dns_error,
            },
        }
