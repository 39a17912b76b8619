"""NetworkService against a real store, real netlink, real nftables and a real DNS server, all inside a namespace."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from dnslib import RCODE

from banger.config import DEFAULTS, Paths, Settings
from banger.errors import InUseError, InvalidInputError, NotFoundError, UnsupportedError
from banger.net.guestnet import GuestNet
from banger.net.ipam import SubnetFullError
from banger.net.links import guest_mac, tap_mac, tap_name
from banger.net.service import NetworkService
from banger.store.db import Store

from .conftest import Namespaces

GATEWAY = "172.30.77.1"

QUERY = """
import sys
from dnslib import DNSRecord
reply = DNSRecord.parse(DNSRecord.question(sys.argv[2]).send(sys.argv[1], 53, timeout=3))
print(reply.header.rcode, *sorted(str(rr.rdata) for rr in reply.rr))
"""

LISTEN = """
import socket, sys, time
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
time.sleep(60)
"""


def _settings(tmp_path: Path, subnet: str = "172.30.77.0/24") -> Settings:
    return Settings(paths=Paths(tmp_path / "home"), values={**DEFAULTS, "subnet": subnet})


def _open_store(path: Path) -> Store:
    store = Store(path)
    store.migrate()
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A migrated store with the kernel and image rows VM rows need for their foreign keys."""
    s = _open_store(tmp_path / "b.db")
    s.execute(
        "INSERT INTO kernels VALUES ('k', 'debian', 'x86_64', '6.1', '00', 'test', 0, '/nonexistent', '2026', '{}')"
    )
    s.execute("INSERT INTO images VALUES ('i', 'test', '/nonexistent', 0, '2026', '{}')")
    try:
        yield s
    finally:
        s.close()


def add_vm(store: Store, vm_id: str, name: str) -> str:
    store.execute(
        "INSERT INTO vms (id, name, state, vmm, kernel, image, vcpus, memory_mib, disk_bytes, created_at, spec) "
        "VALUES (?, ?, 'created', 'qemu', 'k', 'i', 1, 256, 0, '2026', '{}')",
        (vm_id, name),
    )
    return vm_id


def run_service(
    netns: Namespaces,
    tmp_path: Path,
    store: Store,
    body: Callable[[NetworkService, str], Awaitable[None]],
    *,
    subnet: str = "172.30.77.0/24",
    forwarding: str = "0",
) -> None:
    """Set up a service in a fresh namespace, run `body`, and always tear the service down."""
    ns = netns.new("svc")
    # A new namespace inherits the root namespace's ip_forward, which banger itself may have turned on: start
    # from a known value inside the test's own namespace.
    set_forwarding(netns, ns, forwarding)

    async def main() -> None:
        svc = NetworkService(_settings(tmp_path, subnet), store, netns=ns, upstreams=[])
        await svc.setup()
        try:
            assert svc.available, svc.reason
            await body(svc, ns)
        finally:
            await svc.teardown(force=True)

    asyncio.run(main())


def set_forwarding(netns: Namespaces, ns: str, value: str) -> None:
    """Set net.ipv4.ip_forward inside the test's namespace (never the root one)."""
    netns.exec(ns, ["sysctl", "-q", "-w", f"net.ipv4.ip_forward={value}"])


def ask(netns: Namespaces, ns: str, name: str) -> list[str]:
    """Query the service's DNS from inside the namespace, in a separate process: [rcode, addresses...]."""
    return netns.python(ns, QUERY, GATEWAY, name).split()


def nft_table(netns: Namespaces, ns: str) -> str | None:
    done = netns.exec(ns, ["nft", "list", "table", "ip", "banger"], check=False)
    return done.stdout.decode() if done.returncode == 0 else None


def links_by_name(netns: Namespaces, ns: str) -> dict[str, dict[str, object]]:
    return {link["ifname"]: link for link in netns.ip_json(ns, "-d", "link")}


@pytest.mark.net
def test_setup_creates_bridge_table_and_dns(netns: Namespaces, tmp_path: Path, store: Store) -> None:
    async def body(svc: NetworkService, ns: str) -> None:
        bridge = links_by_name(netns, ns)["banger0"]
        assert "UP" in bridge["flags"]  # type: ignore[operator]
        addrs = netns.ip_json(ns, "-4", "addr", "show", "dev", "banger0")[0]["addr_info"]
        assert [(a["local"], a["prefixlen"]) for a in addrs] == [(GATEWAY, 24)]
        table = nft_table(netns, ns)
        assert table is not None and "masquerade" in table
        assert netns.exec(ns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.decode().strip() == "1"
        # The value found first is kept for teardown, and a fresh namespace starts with forwarding off.
        assert (tmp_path / "home" / "run" / "ip_forward.prev").read_text() == "0"
        status = await asyncio.to_thread(svc.status)
        assert status["available"] is True
        assert status["bridge"]["present"] and status["bridge"]["up"]
        assert status["bridge"]["address"] == f"{GATEWAY}/24"
        assert status["dns"]["listening"] == f"{GATEWAY}:53"
        assert status["ip_forward"] == "1"
        assert "table ip banger" in status["nft_table"]
        json.dumps(status)  # the RPC layer sends it as is
        assert ask(netns, ns, "nobody.vm") == [str(RCODE.NXDOMAIN)]
        hosted = await svc.setup_host()
        assert hosted["configured"] is False and f"server=/vm/{GATEWAY}" in hosted["message"]

    run_service(netns, tmp_path, store, body)


@pytest.mark.net
def test_teardown_keeps_forwarding_that_was_already_on(netns: Namespaces, tmp_path: Path, store: Store) -> None:
    async def body(svc: NetworkService, ns: str) -> None:
        assert (tmp_path / "home" / "run" / "ip_forward.prev").read_text() == "1"
        await svc.teardown(force=True)
        assert netns.exec(ns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.decode().strip() == "1"

    run_service(netns, tmp_path, store, body, forwarding="1")


@pytest.mark.net
def test_vm_network_lifecycle(netns: Namespaces, tmp_path: Path, store: Store) -> None:
    alpha, beta = add_vm(store, "a1b2c3d4e5f6", "alpha"), add_vm(store, "0f0e0d0c0b0a", "beta")

    async def body(svc: NetworkService, ns: str) -> None:
        ip_a, ip_b = svc.allocate(alpha, "alpha"), svc.allocate(beta, "beta")
        assert ip_a != ip_b
        assert {ip_a, ip_b} == {IPv4Address("172.30.77.2"), IPv4Address("172.30.77.3")}
        assert svc.allocate(alpha, "alpha") == ip_a, "a second allocate returns the VM's lease"
        assert ask(netns, ns, "alpha.vm") == ["0", str(ip_a)]
        assert ask(netns, ns, "BETA.vm") == ["0", str(ip_b)]
        assert ask(netns, ns, "gamma.vm") == [str(RCODE.NXDOMAIN)]

        net = await svc.plug(alpha)
        assert net == GuestNet(
            tap=tap_name(alpha),
            guest_mac=guest_mac(alpha),
            ip=ip_a,
            prefix=24,
            gateway=IPv4Address(GATEWAY),
            nameservers=(IPv4Address(GATEWAY),),
            search=("vm",),
        )
        assert net.to_json()["address"] == f"{ip_a}/24"
        tap = links_by_name(netns, ns)[net.tap]
        assert tap["address"] == tap_mac(alpha)
        assert tap["master"] == "banger0"
        assert tap["linkinfo"]["info_kind"] == "tun"  # type: ignore[index]

        svc.set_forwards(alpha, [(8080, 80), (2222, 22)])
        table = nft_table(netns, ns) or ""
        assert f"dnat to {ip_a}:80" in table and f"dnat to {ip_a}:22" in table
        with pytest.raises(InUseError, match="8080.*alpha"):
            svc.set_forwards(beta, [(8080, 81)])
        listener = netns.spawn_python(ns, LISTEN, "7000")
        assert netns.wait_line(listener) == "ready"
        with pytest.raises(InUseError, match="7000 is in use by a process on the host"):
            svc.set_forwards(beta, [(7000, 80)])
        svc.set_forwards(beta, [(9090, 90)])
        assert "9090" not in (nft_table(netns, ns) or ""), "forwards of a VM that is not running stay out"
        assert [(f["vm"], f["host_port"], f["active"]) for f in svc.forwards()] == [
            ("alpha", 2222, True),
            ("alpha", 8080, True),
            ("beta", 9090, False),
        ]
        svc.set_forwards(alpha, [(8080, 8000)])
        table = nft_table(netns, ns) or ""
        assert f"dnat to {ip_a}:8000" in table and "2222" not in table

        leases = {row["vm"]: row for row in (await asyncio.to_thread(svc.status))["leases"]}
        assert leases["alpha"]["tap_present"] and leases["alpha"]["plugged"]
        assert not leases["beta"]["tap_present"]

        await svc.unplug(alpha)
        assert net.tap not in links_by_name(netns, ns)
        assert "8080" not in (nft_table(netns, ns) or "")
        assert [f["host_port"] for f in svc.forwards(alpha)] == [8080], "forwards persist across stop"

        store.execute("UPDATE vms SET name='gamma' WHERE id=?", (alpha,))
        svc.rename(alpha, "gamma")
        assert ask(netns, ns, "gamma.vm") == ["0", str(ip_a)]
        assert ask(netns, ns, "alpha.vm") == [str(RCODE.NXDOMAIN)]

        await svc.plug(beta)
        assert f"dnat to {ip_b}:90" in (nft_table(netns, ns) or "")
        await svc.release(beta)
        assert svc.lease(beta) is None
        assert tap_name(beta) not in links_by_name(netns, ns)
        assert "9090" not in (nft_table(netns, ns) or "")
        assert svc.forwards(beta) == []
        assert ask(netns, ns, "beta.vm") == [str(RCODE.NXDOMAIN)]
        delta = add_vm(store, "dddddddddddd", "delta")
        assert svc.allocate(delta, "delta") == ip_b, "a released address is leased again"

    run_service(netns, tmp_path, store, body)


@pytest.mark.net
def test_full_subnet_is_a_clear_error(netns: Namespaces, tmp_path: Path, store: Store) -> None:
    async def body(svc: NetworkService, ns: str) -> None:
        got = [svc.allocate(add_vm(store, f"vm{i:010d}", f"vm{i}"), f"vm{i}") for i in range(5)]
        assert got == [IPv4Address(f"10.77.0.{i}") for i in range(2, 7)]
        with pytest.raises(SubnetFullError, match=r"no free guest address left in 10\.77\.0\.0/29"):
            svc.allocate(add_vm(store, "vmextra00000", "extra"), "extra")
        assert svc.lease("vmextra00000") is None

    run_service(netns, tmp_path, store, body, subnet="10.77.0.0/29")


@pytest.mark.net
def test_concurrent_allocations_never_share_an_address(netns: Namespaces, tmp_path: Path, store: Store) -> None:
    ids = [add_vm(store, f"c{i:011d}", f"c{i}") for i in range(40)]
    # A second connection to the same database: the race then also runs through SQLite's own locking.
    other = _open_store(tmp_path / "b.db")

    async def body(svc: NetworkService, ns: str) -> None:
        twin = NetworkService(svc.settings, other, netns=ns)
        twin.available = True  # shares the first service's namespace; only its store path is exercised
        calls = [asyncio.to_thread((svc if i % 2 else twin).allocate, vm_id, f"c{i}") for i, vm_id in enumerate(ids)]
        got = await asyncio.gather(*calls)
        assert len(set(got)) == len(ids)
        assert all(ip in IPv4Network("172.30.77.0/24") and ip != IPv4Address(GATEWAY) for ip in got)
        assert len(store.query("SELECT ip FROM ip_leases")) == len(ids)

    try:
        run_service(netns, tmp_path, store, body)
    finally:
        other.close()


@pytest.mark.net
def test_restart_keeps_running_guests_then_reconcile_prunes(netns: Namespaces, tmp_path: Path, store: Store) -> None:
    ns = netns.new("restart")
    set_forwarding(netns, ns, "0")
    keep, gone = add_vm(store, "aaaaaaaaaaaa", "keep"), add_vm(store, "bbbbbbbbbbbb", "gone")

    async def main() -> None:
        first = NetworkService(_settings(tmp_path), store, netns=ns, upstreams=[])
        await first.setup()
        ip_keep = first.allocate(keep, "keep")
        first.allocate(gone, "gone")
        await first.plug(keep)
        await first.plug(gone)
        first.set_forwards(keep, [(8080, 80)])
        await first.shutdown()
        # The daemon is gone but its VMs run on: their TAPs, the bridge and the table (with forwards) stay.
        names = links_by_name(netns, ns)
        assert {"banger0", tap_name(keep), tap_name(gone)} <= set(names)
        assert f"dnat to {ip_keep}:80" in (nft_table(netns, ns) or "")

        second = NetworkService(_settings(tmp_path), store, netns=ns, upstreams=[])
        try:
            await second.setup()
            assert f"dnat to {ip_keep}:80" in (nft_table(netns, ns) or ""), "forwards survive the restart"
            netns.ip(ns, "tuntap", "add", "dev", "bg-orphan", "mode", "tap")
            netns.ip(ns, "link", "set", "bg-orphan", "master", "banger0")
            netns.ip(ns, "link", "set", tap_name(keep), "nomaster")
            netns.exec(ns, ["nft", "delete", "table", "ip", "banger"])

            result = await second.reconcile({keep})
            assert sorted(result["removed_taps"]) == sorted(["bg-orphan", tap_name(gone)])
            assert result["repaired_taps"] == [tap_name(keep)]
            names = links_by_name(netns, ns)
            assert tap_name(gone) not in names and "bg-orphan" not in names
            assert names[tap_name(keep)]["master"] == "banger0"
            assert f"dnat to {ip_keep}:80" in (nft_table(netns, ns) or ""), "reconcile re-applies the table"
            assert ask(netns, ns, "keep.vm") == ["0", str(ip_keep)]

            with pytest.raises(InUseError):
                await second.teardown()
            await second.unplug(keep)
            result = await second.teardown()
            assert result["removed_taps"] == []
        finally:
            await second.teardown(force=True)
        names = links_by_name(netns, ns)
        assert set(names) == {"lo"}, "teardown leaves no TAP and no bridge"
        assert nft_table(netns, ns) is None
        assert netns.exec(ns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.decode().strip() == "0"
        assert not (tmp_path / "home" / "run" / "ip_forward.prev").exists()
        assert (await asyncio.to_thread(second.status))["dns"]["listening"] is None
        assert svc_is_unavailable(second)

    asyncio.run(main())


def svc_is_unavailable(svc: NetworkService) -> bool:
    try:
        svc.allocate("aaaaaaaaaaaa", "keep")
    except UnsupportedError:
        return True
    return False


def test_unavailable_network_is_reported_not_fatal(tmp_path: Path, store: Store) -> None:
    vm = add_vm(store, "eeeeeeeeeeee", "e")

    async def main() -> None:
        bad = NetworkService(_settings(tmp_path, "not-a-subnet"), store)
        await bad.setup()
        assert not bad.available and "not-a-subnet" in (bad.reason or "")
        with pytest.raises(UnsupportedError, match="unavailable: invalid network configuration"):
            bad.allocate(vm, "e")
        with pytest.raises(UnsupportedError):
            await bad.plug(vm)
        # A missing namespace must be reported, not created (pyroute2 would create it silently).
        missing = NetworkService(_settings(tmp_path), store, netns="banger-test-does-not-exist")
        await missing.setup()
        assert not missing.available and "does not exist" in (missing.reason or "")
        assert not Path("/run/netns/banger-test-does-not-exist").exists()
        await missing.unplug(vm)  # stopping a VM still works without networking

    asyncio.run(main())


def test_forward_validation(tmp_path: Path, store: Store) -> None:
    svc = NetworkService(_settings(tmp_path), store)
    vm = add_vm(store, "ffffffffffff", "f")
    with pytest.raises(InvalidInputError, match="has no network"):
        svc.set_forwards(vm, [(8080, 80)])
    store.execute("INSERT INTO ip_leases VALUES ('172.30.77.9', ?, '2026')", (vm,))
    for bad in ([(0, 80)], [(8080, 70000)], [(True, 80)], [(8080, 80), (8080, 81)]):
        with pytest.raises(InvalidInputError):
            svc.set_forwards(vm, bad)
    svc.set_forwards(vm, [(8080, 80)])  # not plugged: stored only, no nft needed
    assert [(f["host_port"], f["guest_port"], f["active"]) for f in svc.forwards(vm)] == [(8080, 80, False)]
    store.execute("DELETE FROM vms WHERE id=?", (vm,))
    assert svc.forwards() == [], "forwards go with their VM"
    with pytest.raises(NotFoundError):
        svc._insert_lease("no-such-vm")
