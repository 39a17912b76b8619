"""Bridge and TAP management through netlink, inside a throwaway namespace."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from banger.errors import InUseError, InvalidInputError, NotFoundError, ToolError
from banger.net.links import NETNS_RUN_DIR, BridgeConfig, Links, guest_mac, mac_for, tap_mac, tap_name

from .conftest import Namespaces


def test_tap_name_fits_ifnamsiz() -> None:
    name = tap_name("0123456789abcdef-long-vm-id")
    assert name == "bg-0123456789ab"
    assert len(name) == 15
    assert tap_name("AB-cd") == "bg-abcd"
    with pytest.raises(InvalidInputError):
        tap_name("---")


def test_mac_is_stable_local_unicast() -> None:
    mac = mac_for("vm-1")
    assert mac == mac_for("vm-1")
    assert mac != mac_for("vm-2")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02, "locally administered bit must be set"
    assert not first & 0x01, "must be unicast"
    assert len(mac.split(":")) == 6
    assert guest_mac("vm-1") != tap_mac("vm-1"), "a TAP carrying the guest's MAC would swallow its frames"
    assert guest_mac("vm-1") == guest_mac("vm-1")


def test_bridge_config_gateway() -> None:
    cfg = BridgeConfig(subnet=IPv4Network("10.9.8.0/24"))
    assert str(cfg.gateway) == "10.9.8.1"
    assert str(cfg.interface) == "10.9.8.1/24"
    with pytest.raises(InvalidInputError):
        BridgeConfig(name="this-name-is-too-long")
    with pytest.raises(InvalidInputError):
        BridgeConfig(subnet=IPv4Network("10.0.0.0/31"))


@pytest.mark.net
def test_bridge_and_taps_lifecycle(netns: Namespaces) -> None:
    ns = netns.new("links")
    cfg = BridgeConfig(name="banger0", subnet=IPv4Network("172.30.77.0/24"))
    taps = {tap_name("vm-one"): tap_mac("vm-one"), tap_name("vm-two"): tap_mac("vm-two")}
    with Links(ns) as links:
        index = links.ensure_bridge(cfg)
        assert links.ensure_bridge(cfg) == index, "ensure_bridge must be idempotent"
        for name, mac in taps.items():
            first = links.ensure_tap(name, mac, cfg.name)
            again = links.ensure_tap(name, mac, cfg.name)
            assert first == again
        assert [t.name for t in links.list_taps("bg-")] == sorted(taps)
        assert links.list_taps("zz-") == []

    by_name = {link["ifname"]: link for link in netns.ip_json(ns, "-d", "link")}
    bridge = by_name["banger0"]
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in bridge["flags"]
    addrs = netns.ip_json(ns, "-4", "addr", "show", "dev", "banger0")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs] == [("172.30.77.1", 24)]
    for name, mac in taps.items():
        link = by_name[name]
        assert link["address"] == mac
        assert link["master"] == "banger0"
        assert link["linkinfo"]["info_kind"] == "tun"
        assert link["linkinfo"]["info_data"]["type"] == "tap"
        assert link["linkinfo"]["info_data"]["pi"] is False
        assert link["linkinfo"]["info_data"]["vnet_hdr"] is True
        assert "UP" in link["flags"]

    # Adding a TAP must not change the bridge's MAC (guests cache it as their gateway's).
    with Links(ns) as links:
        links.ensure_tap(tap_name("vm-three"), mac_for("vm-three"), cfg.name)
    assert netns.ip_json(ns, "link", "show", "banger0")[0]["address"] == bridge["address"]

    with Links(ns) as links:
        for name in [*taps, tap_name("vm-three")]:
            assert links.remove_tap(name) is True
            assert links.remove_tap(name) is False
        assert links.list_taps() == []
        assert links.remove_bridge(cfg.name) is True
        assert links.remove_bridge(cfg.name) is False
    remaining = {link["ifname"] for link in netns.ip_json(ns, "link")}
    assert remaining == {"lo"}


@pytest.mark.net
def test_ensure_tap_repairs_mac_and_master(netns: Namespaces) -> None:
    ns = netns.new("repair")
    with Links(ns) as links:
        links.ensure_bridge()
        links.ensure_tap("bg-x", mac_for("old"))
        netns.ip(ns, "link", "set", "bg-x", "nomaster")
        info = links.ensure_tap("bg-x", mac_for("new"))
        assert info.mac == mac_for("new")
        assert info.master == "banger0"
        assert info.up


@pytest.mark.net
def test_refuses_foreign_devices(netns: Namespaces) -> None:
    ns = netns.new("foreign")
    # A veth pair (the dummy driver is not available everywhere) with names banger would use.
    netns.ip(ns, "link", "add", "bg-dummy", "type", "veth", "peer", "name", "banger0")
    with Links(ns) as links:
        with pytest.raises(InUseError):
            links.ensure_bridge()
        with pytest.raises(InUseError):
            links.remove_tap("bg-dummy")
        assert links.list_taps() == [], "a non-TAP device with the prefix is not banger's"
        with pytest.raises(InUseError):
            links.remove_bridge("banger0")
    assert {link["ifname"] for link in netns.ip_json(ns, "link")} == {"lo", "bg-dummy", "banger0"}


@pytest.mark.net
def test_tap_needs_bridge(netns: Namespaces) -> None:
    ns = netns.new("nobridge")
    with Links(ns) as links, pytest.raises(ToolError, match="bridge banger0 does not exist"):
        links.ensure_tap("bg-y", mac_for("y"))


@pytest.mark.net
def test_prune_taps_keeps_wanted(netns: Namespaces) -> None:
    ns = netns.new("prune")
    with Links(ns) as links:
        links.ensure_bridge()
        for vm in ("a1", "b2", "c3"):
            links.ensure_tap(tap_name(vm), tap_mac(vm))
        assert links.prune_taps({"bg-b2"}) == ["bg-a1", "bg-c3"]
        assert [t.name for t in links.list_taps()] == ["bg-b2"]
        assert links.prune_taps({"bg-b2"}) == []


def test_missing_namespace_is_not_created() -> None:
    name = "banger-test-absent-ns"
    assert not (NETNS_RUN_DIR / name).exists()
    with pytest.raises(NotFoundError):
        Links(name)
    assert not (NETNS_RUN_DIR / name).exists()


@pytest.mark.net
def test_failed_tap_setup_leaves_nothing(netns: Namespaces) -> None:
    ns = netns.new("rollback")
    with Links(ns) as links:
        links.ensure_bridge()
        with pytest.raises(InvalidInputError):
            links.ensure_tap("bg-bad", "not-a-mac")
        # Multicast MAC: well-formed, so the TAP gets created, but the kernel refuses it; the TAP must go again.
        with pytest.raises(ToolError, match="set MAC of bg-bad"):
            links.ensure_tap("bg-bad", "03:00:00:00:00:01")
        assert links.get_tap("bg-bad") is None
    assert "bg-bad" not in {link["ifname"] for link in netns.ip_json(ns, "link")}
