"""init.py's pure helpers: mount planning, `ip` argv, resolv.conf, agent argv (all without being PID 1)."""

from __future__ import annotations

import subprocess
import sys

from banger.guest import init
from banger.guest.seed import HaltAction, NetInterface, Network, SeedMeta

from .conftest import GUEST_DIR, GUEST_PYTHON

META = SeedMeta(
    hostname="brave-otter",
    vm_name="brave-otter",
    network=Network(
        interfaces=(NetInterface("eth0", "02:AB:00:00:00:01", "172.30.0.5", 24, gateway="172.30.0.1", mtu=1400),),
        nameservers=("172.30.0.1", "9.9.9.9"),
        search=("banger.internal",),
    ),
).to_json()


def test_network_commands_from_metadata() -> None:
    cmds = init.network_commands(META["network"], {"02:ab:00:00:00:01": "ens3", "00:00:00:00:00:00": "lo"})
    assert cmds == [
        ["ip", "link", "set", "dev", "lo", "up"],
        ["ip", "link", "set", "dev", "ens3", "name", "eth0"],
        ["ip", "link", "set", "dev", "eth0", "mtu", "1400"],
        ["ip", "address", "add", "172.30.0.5/24", "dev", "eth0"],
        ["ip", "link", "set", "dev", "eth0", "up"],
        ["ip", "-4", "route", "add", "default", "via", "172.30.0.1", "dev", "eth0"],
    ]


def test_network_commands_without_network_only_bring_up_loopback() -> None:
    assert init.network_commands(None, {}) == [["ip", "link", "set", "dev", "lo", "up"]]
    v6 = {
        "interfaces": [
            {"name": "eth0", "mac": "02:00:00:00:00:02", "address": "fd00::5", "prefix": 64, "gateway": "fd00::1"}
        ]
    }
    assert init.network_commands(v6, {"02:00:00:00:00:02": "eth0"})[-1] == [
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00::1",
        "dev",
        "eth0",
    ]


def test_resolv_conf_text() -> None:
    text = init.resolv_conf(META["network"])
    assert text is not None
    assert text.splitlines()[1:] == ["search banger.internal", "nameserver 172.30.0.1", "nameserver 9.9.9.9"]
    assert init.resolv_conf(None) is None
    assert init.resolv_conf({"interfaces": [], "nameservers": [], "search": []}) is None
    many = init.resolv_conf({"nameservers": ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"]})
    assert many is not None and "4.4.4.4" not in many


def test_hosts_file_names_the_guest() -> None:
    assert "127.0.1.1\tbrave-otter\n" in init.hosts_file("brave-otter")


def test_plan_mounts_skips_mounted_and_never_hides_the_seed() -> None:
    mountinfo = (
        "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw\n"
        "24 22 0:20 / /proc rw - proc proc rw\n"
        "25 22 254:16 / /run/banger/seed ro - ext4 /dev/vdb ro\n"
        "26 22 0:30 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
    )
    mounted = init.parse_mountinfo(mountinfo)
    assert "/mnt/with space" in mounted
    targets = [m.target for m in init.plan_mounts(mounted)]
    assert targets == ["/sys", "/dev/pts", "/dev/shm", "/tmp"]  # /run holds the seed: no tmpfs over it


def test_agent_args_follow_transport() -> None:
    assert init.agent_args(META) == ["--init-pid", "1", "--serial", "org.banger.agent", "--vsock", "1024"]
    vsock = init.agent_args({"agent": {"transport": "vsock", "vsock_port": 5000}})
    assert vsock[-2:] == ["--vsock", "5000"] and "--serial" not in vsock


def test_halt_command_follows_metadata() -> None:
    assert init.halt_command(META) == init.RB_POWER_OFF
    assert init.halt_command(SeedMeta("a", "a", halt=HaltAction.REBOOT).to_json()) == init.RB_AUTOBOOT
    assert init.halt_command(None) == init.RB_POWER_OFF


def test_power_key_press_is_recognised() -> None:
    def event(kind: int, code: int, value: int) -> bytes:
        return init.INPUT_EVENT.pack(1700000000, 5, kind, code, value)

    press, release, sync = event(1, 116, 1), event(1, 116, 0), event(0, 0, 0)
    assert init.power_key_pressed(sync + press + sync)
    assert not init.power_key_pressed(release + sync)
    assert not init.power_key_pressed(event(1, 30, 1))  # KEY_A
    assert not init.power_key_pressed(press[:-1])  # a torn event is not a press


def test_guest_modules_import_without_banger() -> None:
    # The seed has no banger package: each guest module must import with the stdlib and its siblings alone.
    code = "import sys; sys.path.insert(0, sys.argv[1]); import init, agent, protocol, transfer, execs, ports"
    done = subprocess.run([GUEST_PYTHON, "-I", "-c", code, str(GUEST_DIR)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run([GUEST_PYTHON, str(GUEST_DIR / "init.py")], capture_output=True, text=True)
    assert refused.returncode == 1 and "must run as PID 1" in refused.stderr
    assert sys.modules["banger.guest.init"] is init


def test_boot_imports_leave_out_what_banger_never_uses() -> None:
    # What the agent process does first (init.run_agent): asyncio and shutil load without ssl, bz2 or lzma, which
    # stay importable for anything that asks for them later.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import init\n"
        "init.import_without(init.UNNEEDED_AT_BOOT, ('asyncio', 'shutil'))\n"
        "loaded = sorted(m for m in init.UNNEEDED_AT_BOOT if m in sys.modules)\n"
        "import shutil, asyncio.base_events as base, ssl, bz2, lzma\n"
        "print(loaded, shutil._BZ2_SUPPORTED, base.ssl is None, ssl.HAS_SNI, bool(bz2.compress(b'x')))\n"
    )
    done = subprocess.run([GUEST_PYTHON, "-I", "-c", code, str(GUEST_DIR)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False", "True", "True", "True"]
