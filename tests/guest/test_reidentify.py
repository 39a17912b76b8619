"""The guest side of a clone's new identity: the commands it plans (its effects are checked on real guests)."""

from __future__ import annotations

from banger.guest import reidentify


def test_network_commands_move_the_interface_to_its_new_mac_and_address() -> None:
    net = {"name": "eth0", "mac": "02:00:00:00:00:07", "address": "172.30.77.7", "prefix": 24, "gateway": "172.30.77.1"}
    cmds = reidentify.network_commands(net)
    assert cmds[0] == ["ip", "link", "set", "dev", "eth0", "down"]
    assert ["ip", "link", "set", "dev", "eth0", "address", "02:00:00:00:00:07"] in cmds
    flush = cmds.index(["ip", "address", "flush", "dev", "eth0"])
    assert cmds[flush + 1] == ["ip", "address", "add", "172.30.77.7/24", "dev", "eth0"]
    assert cmds[-1] == ["ip", "-4", "route", "replace", "default", "via", "172.30.77.1", "dev", "eth0"]


def test_without_a_gateway_no_route_is_set() -> None:
    net = {"name": "eth0", "mac": "02:00:00:00:00:07", "address": "10.0.0.2", "prefix": 8}
    assert not any("route" in c for c in reidentify.network_commands(net))
