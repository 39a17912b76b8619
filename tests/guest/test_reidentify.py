"""The guest side of a clone's new identity: the commands it plans (its effects are checked on real guests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from banger.guest import reidentify
from banger.vms.hostkeys import KEY_TYPES, make_host_keys


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


def test_host_made_keys_replace_the_snapshot_s_with_private_modes(tmp_path: Path) -> None:
    etc = tmp_path / "ssh"
    etc.mkdir()
    (etc / "sshd_config").write_text("# sshd\n")
    for old in ("ssh_host_rsa_key", "ssh_host_rsa_key.pub", "ssh_host_dsa_key"):
        (etc / old).write_text("the snapshot's key\n")
    keys = make_host_keys("root@clone-1")  # the real ssh-keygen, as the daemon runs it
    assert keys is not None and sorted(keys) == sorted(KEY_TYPES)
    public = reidentify.new_ssh_host_keys(keys, str(etc))
    assert public == sorted(k["public"] for k in keys.values())
    assert all(p.endswith("root@clone-1") for p in public)
    assert sorted(p.name for p in etc.iterdir()) == sorted(
        ["sshd_config"] + [f"ssh_host_{t}_key{s}" for t in KEY_TYPES for s in ("", ".pub")]
    )
    for kind in KEY_TYPES:
        private = etc / f"ssh_host_{kind}_key"
        assert private.stat().st_mode & 0o777 == 0o600
        assert private.read_text() == keys[kind]["private"]
        assert (etc / f"ssh_host_{kind}_key.pub").stat().st_mode & 0o777 == 0o644
        # The pair matches: ssh-keygen derives the same public key from the private one written in the guest.
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, timeout=30)
        assert derived.stdout.split()[:2] == keys[kind]["public"].split()[:2]
    assert make_host_keys("root@clone-2") != keys  # every clone its own


def test_no_ssh_server_means_no_keys(tmp_path: Path) -> None:
    assert reidentify.new_ssh_host_keys({"ed25519": {"private": "x", "public": "y"}}, str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_the_host_key_pool_hands_out_each_set_once_and_refills_after_a_clone(tmp_path: Path) -> None:
    import asyncio

    from banger.vms.hostkeys import HostKeyPool

    async def main() -> None:
        pool = HostKeyPool(size=2)
        first = await pool.take("root@c1")  # nothing made ahead yet: made on the spot
        assert first is not None and sorted(first) == sorted(KEY_TYPES)
        assert pool._filling is None and not pool._ready  # nothing is made before a clone asked
        pool.refill()
        assert pool._filling is not None
        await pool._filling
        assert len(pool._ready) == 2
        second, third = await pool.take("root@c2"), await pool.take("root@c3")
        assert not pool._ready  # each set goes out once
        assert second is not None and third is not None
        assert all(pair["public"].endswith(" root@c2") for pair in second.values())
        privates = [keys[kind]["private"] for keys in (first, second, third) for kind in KEY_TYPES]
        assert len(set(privates)) == len(privates)  # every clone its own keys
        for kind in KEY_TYPES:  # the public line, renamed, still matches its private key
            private = tmp_path / f"{kind}_key"
            private.write_text(second[kind]["private"])
            private.chmod(0o600)
            derived = subprocess.run(
                ["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, timeout=30
            )
            assert derived.stdout.split()[:2] == second[kind]["public"].split()[:2]
        pool.refill()
        await pool.close()  # a daemon stopping mid-refill: cancelled, nothing kept
        assert not pool._ready

    asyncio.run(main())
