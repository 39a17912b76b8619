"""Snapshots and clones of real QEMU guests (TCG), networked inside network namespaces the test creates.

One original VM runs a counter (a detached shell loop) and a small HTTP server, and has a file written in it;
`vm clone --count 3` forks it. The clones must be machines of their own (name, MAC, address, hostname,
machine-id, DNS name) that still have the file and whose counter and server go on running.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BangerEnv
from tests.vms.conftest import installed_home
from tests.vms.test_vm_network import Topology, ask, guest

pytestmark = [pytest.mark.vm, pytest.mark.net]

CLONES = ["c-1", "c-2", "c-3"]
# A tiny HTTP server that answers every request with the content of /srv/www/who: http.server's imports (and its
# DNS lookup before it listens) take minutes on a loaded 1-vCPU TCG guest.
SERVE = """import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(16)
while True:
    c, _ = s.accept()
    c.recv(4096)
    try:
        body = open("/srv/www/who", "rb").read()
    except OSError:
        body = b"nobody"
    c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\n" + body)
    c.close()
"""
START_COUNTER = (
    f"mkdir -p /srv/www && echo written-before-snapshot > /root/marker && cat > /srv/serve.py <<'EOF'\n{SERVE}EOF\n"
    'setsid nohup sh -c "i=0; while true; do i=\\$((i+1)); echo \\$i > /tmp/counter; sleep 0.5; done" '
    ">/dev/null 2>&1 </dev/null & "
    "setsid nohup python3 /srv/serve.py >/dev/null 2>&1 </dev/null & sleep 0.5"
)
# Port 8000 is 1F40 in /proc/net/tcp; a shell loop is the cheapest wait on a guest this slow.
WAIT_LISTEN = "for i in $(seq 100); do grep -q ':1F40 00000000:0000 0A' /proc/net/tcp && exit 0; sleep 1; done; exit 1"


def fetch(host: str) -> str:
    """A guest command printing the body `host`'s server answers (plain sockets: urllib is slow to import)."""
    code = (
        "import socket; c = socket.create_connection(('HOST', 8000), 20); c.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); "
        "print(c.makefile('rb').read().split(b'\\r\\n\\r\\n', 1)[1].decode())"
    ).replace("HOST", host)
    return f'python3 -c "{code}"'


@pytest.fixture(scope="module")
def cloned(debian_kernel: Path, debian_image: Path) -> Iterator[tuple[BangerEnv, Topology]]:
    topo = Topology()
    topo.up()
    try:
        with installed_home(debian_kernel, wrap=("ip", "netns", "exec", topo.host)) as benv:
            r = benv.cli("vm", "create", "--name", "orig", "--vcpus", "1", "--memory", "512", timeout=600)
            assert r.returncode == 0, r.stderr
            guest(benv, "orig", START_COUNTER)
            # The server must be listening before the snapshot: the clones inherit the listening socket.
            # One guest-side loop: polling with an exec each time would starve the 1-vCPU TCG guest.
            guest(benv, "orig", WAIT_LISTEN)
            # An hour off: a clone whose clock was not stepped to the host's would show it.
            guest(benv, "orig", "date -s @$(( $(date +%s) - 3600 )) >/dev/null")
            r = benv.cli("vm", "clone", "orig", "--name", "c", "--count", "3", "--json", timeout=600)
            assert r.returncode == 0, r.stderr
            assert [c["name"] for c in json.loads(r.stdout)] == CLONES
            yield benv, topo
    finally:
        topo.down()


def show(benv: BangerEnv, name: str) -> dict[str, object]:
    return dict(json.loads(benv.cli("vm", "show", name, "--json", check=True).stdout))


def counter(benv: BangerEnv, name: str) -> int:
    return int(guest(benv, name, "cat /tmp/counter").strip())


def test_clones_are_machines_of_their_own(cloned: tuple[BangerEnv, Topology]) -> None:
    benv, topo = cloned
    seen: dict[str, set[str]] = {"ip": set(), "mac": set(), "hostname": set(), "machine_id": set()}
    for name in ["orig", *CLONES]:
        info = show(benv, name)
        assert info["state"] == "running"
        ip = str(info["ip"])
        out = guest(benv, name, "hostname; cat /etc/machine-id || echo none; cat /sys/class/net/eth0/address")
        hostname, machine_id, mac = out.split()
        assert hostname == name
        assert f"inet {ip}/24" in guest(benv, name, "ip -4 addr show dev eth0")
        assert ask(topo, f"{name}.vm") == f"NOERROR ['{ip}']\n"
        for key, value in (("ip", ip), ("mac", mac), ("hostname", hostname), ("machine_id", machine_id)):
            assert value not in seen[key], f"{name} shares its {key} {value}"
            seen[key].add(value)
        if name != "orig":  # stepped to the host's clock (the guest's jiffies clock loses a little under TCG)
            assert abs(float(guest(benv, name, "date +%s.%N")) - time.time()) < 600


def test_clones_keep_files_and_running_processes(cloned: tuple[BangerEnv, Topology]) -> None:
    benv, _ = cloned
    for name in ["orig", *CLONES]:
        assert guest(benv, name, "cat /root/marker").strip() == "written-before-snapshot"
        first = counter(benv, name)
        time.sleep(1.5)
        assert counter(benv, name) > first, f"the counter stopped in {name}"


def test_clones_reach_each_other_by_name_and_do_not_disturb_one_another(cloned: tuple[BangerEnv, Topology]) -> None:
    benv, _ = cloned
    # Each guest serves its own hostname from the server that was already running at snapshot time.
    for name in ["orig", *CLONES]:
        guest(benv, name, "hostname > /srv/www/who")
    for src, dst in (("c-1", "c-2"), ("c-2", "c-3"), ("c-3", "orig"), ("orig", "c-1")):
        assert guest(benv, src, fetch(f"{dst}.vm")).strip() == dst
    # A file written in one clone is not seen by the others or the original.
    guest(benv, "c-1", "echo mine > /root/only-c1")
    for name in ["orig", "c-2", "c-3"]:
        assert guest(benv, name, "cat /root/only-c1 2>/dev/null || echo absent").strip() == "absent"


def test_the_original_is_back_on_its_own_disk_after_the_clone(cloned: tuple[BangerEnv, Topology]) -> None:
    # `vm clone` does not wait for the original's write overlay to be folded back into its disk (the clones start
    # meanwhile); the fold still happens, and the original runs on.
    benv, _ = cloned
    orig_dir = Path(str(show(benv, "orig")["dir"]))
    deadline = time.monotonic() + 120
    while leftovers := sorted(p.name for p in orig_dir.glob("root.*.writes-*.qcow2")):
        assert time.monotonic() < deadline, f"the write overlay was never folded back: {leftovers}"
        time.sleep(0.5)
    assert show(benv, "orig")["state"] == "running"
    assert guest(benv, "orig", "echo after-the-fold > /root/fold && sync && cat /root/fold").strip() == "after-the-fold"


def test_snapshot_listing_and_removal_rules(cloned: tuple[BangerEnv, Topology]) -> None:
    benv, _ = cloned
    snaps = json.loads(benv.cli("snapshot", "ls", "--json", check=True).stdout)
    implicit = [s for s in snaps if s["vm"] == "orig" and s["implicit"]]
    assert len(implicit) == 1
    snap = implicit[0]
    assert {"name", "vm", "vmm", "vmm_version", "created_at", "size_bytes"} <= snap.keys()
    assert snap["vmm"] == "qemu" and snap["size_bytes"] > 0 and sorted(snap["used_by"]) == CLONES
    r = benv.cli("snapshot", "rm", snap["name"])
    assert r.returncode == 1 and "in use" in r.stderr
    assert benv.cli("snapshot", "show", snap["name"], "--json", check=True).returncode == 0
    # A clone's disk is an overlay: it holds what the clone wrote, not a copy of the snapshot's disk.
    clone_dir = Path(str(show(benv, "c-1")["dir"]))
    overlay = clone_dir / "root.qcow2"
    assert overlay.stat().st_blocks * 512 < 64 << 20
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True, text=True)
    assert json.loads(out.stdout)["backing-filename"].endswith("root.img")


def test_explicit_snapshot_restore_and_refusals(cloned: tuple[BangerEnv, Topology]) -> None:
    benv, _ = cloned
    r = benv.cli("vm", "snapshot", "orig", "--name", "s1", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pause_seconds"] < 30
    r = benv.cli("vm", "create", "--from-snapshot", "s1", "--image", "debian-bookworm", "--name", "nope")
    assert r.returncode != 0 and "--image" in r.stderr and "--from-snapshot" in r.stderr
    r = benv.cli("vm", "create", "--from-snapshot", "s1", "--net", "none", "--name", "nope")
    assert r.returncode != 0 and "network" in r.stderr
    r = benv.cli("vm", "create", "--from-snapshot", "s1", "--name", "r1", "--no-start", "--json", check=True)
    assert json.loads(r.stdout)["state"] == "created"
    assert benv.cli("vm", "start", "r1", timeout=300).returncode == 0
    assert guest(benv, "r1", "hostname").strip() == "r1"
    benv.cli("vm", "rm", "-f", "r1", check=True, timeout=120)
    assert benv.cli("snapshot", "rm", "s1").returncode == 0
    assert benv.cli("snapshot", "show", "s1").returncode == 1


def test_restore_under_another_qemu_version_is_refused(cloned: tuple[BangerEnv, Topology], tmp_path: Path) -> None:
    benv, _ = cloned
    assert benv.cli("vm", "snapshot", "orig", "--name", "s2", timeout=300).returncode == 0
    wrapper = tmp_path / "qemu-other"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "QEMU emulator version 9.9.1"; exit 0; fi\n'
        'exec qemu-system-x86_64 "$@"\n'
    )
    wrapper.chmod(0o755)
    config = benv.home / "config.toml"
    config.write_text(f'qemu_bin = "{wrapper}"\n')
    try:
        benv.stop_daemon()
        r = benv.cli("vm", "create", "--from-snapshot", "s2", "--name", "other")
        assert r.returncode == 1
        assert "7.2" in r.stderr and "9.9.1" in r.stderr
        assert benv.cli("vm", "show", "other").returncode == 1  # nothing half-made
    finally:
        config.unlink()
        benv.stop_daemon()
    assert benv.cli("snapshot", "rm", "s2").returncode == 0


def test_last_clone_takes_the_implicit_snapshot_with_it(cloned: tuple[BangerEnv, Topology]) -> None:
    benv, _ = cloned

    def implicit() -> set[str]:
        return {s["name"] for s in json.loads(benv.cli("snapshot", "ls", "--json", check=True).stdout) if s["implicit"]}

    before = implicit()
    r = benv.cli("vm", "clone", "orig", "--name", "solo", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "solo"
    (mine,) = implicit() - before
    # A snapshot with --stop leaves the VM cleanly stopped; a clone then boots cold from its own overlay.
    parent_disk = Path(json.loads(benv.cli("snapshot", "show", mine, "--json", check=True).stdout)["path"]) / "root.img"
    before_stat = parent_disk.stat()
    r = benv.cli("vm", "snapshot", "solo", "--name", "s3", "--stop", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    after_stat = parent_disk.stat()  # a clone's snapshot never writes into the disk its siblings share
    assert (after_stat.st_mtime_ns, after_stat.st_size) == (before_stat.st_mtime_ns, before_stat.st_size)
    assert show(benv, "solo")["state"] == "stopped"
    assert benv.cli("snapshot", "rm", "s3").returncode == 0
    assert benv.cli("vm", "start", "solo", timeout=600).returncode == 0
    assert guest(benv, "solo", "hostname; cat /root/marker").split() == ["solo", "written-before-snapshot"]
    benv.cli("vm", "rm", "-f", "solo", check=True, timeout=120)
    assert benv.cli("snapshot", "show", mine).returncode == 1
    assert implicit() == before
