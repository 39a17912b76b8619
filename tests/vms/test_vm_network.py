"""Guest networking with real QEMU guests, inside network namespaces the test creates.

Topology: namespace HOST runs bangerd (bridge banger0, NAT table, DNS); namespace OUT stands for the outside
world, joined to HOST by a veth pair (HOST 10.99.0.1 <-> OUT 10.99.0.2, HOST's default route via OUT). The root
namespace is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.net.links import tap_name
from tests.conftest import BangerEnv
from tests.foundation.test_daemon import wait_for
from tests.vms.conftest import installed_home

pytestmark = [pytest.mark.vm, pytest.mark.net]


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


class Topology:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.host, self.out = f"banger-test-h{tag}", f"banger-test-o{tag}"
        self.server: subprocess.Popen[str] | None = None
        self.server_log = Path(f"/tmp/{self.out}.log")

    def up(self) -> None:
        ip("netns", "add", self.host)
        ip("netns", "add", self.out)
        for ns in (self.host, self.out):
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.host, "link", "add", "uplink", "type", "veth", "peer", "name", "wan", "netns", self.out)
        ip("-n", self.host, "addr", "add", "10.99.0.1/24", "dev", "uplink")
        ip("-n", self.host, "link", "set", "uplink", "up")
        ip("-n", self.out, "addr", "add", "10.99.0.2/24", "dev", "wan")
        ip("-n", self.out, "link", "set", "wan", "up")
        ip("-n", self.host, "route", "add", "default", "via", "10.99.0.2")
        www = Path(f"/tmp/{self.out}-www")
        www.mkdir(exist_ok=True)
        (www / "marker").write_text("outside-world\n")
        self.server_log.write_text("")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.out, "python3", "-m", "http.server", "8080", "--bind", "10.99.0.2"],
            cwd=www,
            stdout=subprocess.DEVNULL,
            stderr=self.server_log.open("w"),
            text=True,
        )

    def down(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        for ns in (self.host, self.out):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def net_home(debian_kernel: Path, debian_image: Path) -> Iterator[tuple[BangerEnv, Topology]]:
    topo = Topology()
    topo.up()
    try:
        with installed_home(debian_kernel, wrap=("ip", "netns", "exec", topo.host)) as benv:
            for name, extra in (("web", ["--publish", "0.0.0.0:8082:8000"]), ("client", [])):
                r = benv.cli("vm", "create", "--name", name, *extra, "--vcpus", "1", "--memory", "512", timeout=600)
                assert r.returncode == 0, r.stderr
            # Shared by the tests that fetch from it; none of them changes web or client.
            guest(
                benv,
                "web",
                "cd /tmp && echo hello-from-web > index.html && "
                "setsid python3 -m http.server 8000 >/dev/null 2>&1 < /dev/null & sleep 0.2",
            )
            yield benv, topo
            for name in ("web", "client"):
                benv.cli("vm", "rm", "-f", name, check=True, timeout=120)
            # With no VM left, the network goes entirely (checked here: a test doing it would take the others' VMs).
            benv.cli("network", "teardown", check=True)
            assert "banger0" not in ip("-n", topo.host, "-o", "link")
            tables = subprocess.run(
                ["ip", "netns", "exec", topo.host, "nft", "list", "tables"], capture_output=True, text=True
            )
            assert "banger" not in tables.stdout
    finally:
        topo.down()


def guest(benv: BangerEnv, name: str, script: str, check: bool = True) -> str:
    r = benv.cli("vm", "exec", name, "--", "sh", "-c", script, timeout=120)
    if check:
        assert r.returncode == 0, f"{script}: {r.stderr}"
    return r.stdout


def ask(topo: Topology, name: str) -> str:
    """Query the daemon's DNS server on the bridge address from the host namespace: 'RCODE [answers]'."""
    code = (
        "import dnslib,sys; q=dnslib.DNSRecord.question(sys.argv[1]); "
        "r=dnslib.DNSRecord.parse(q.send('172.30.77.1', 53, timeout=5)); "
        "print(dnslib.RCODE[r.header.rcode], [str(a.rdata) for a in r.rr])"
    )
    return subprocess.run(
        ["ip", "netns", "exec", topo.host, sys.executable, "-c", code, name], check=True, capture_output=True, text=True
    ).stdout


def fetch_cmd(url: str) -> str:
    """A guest shell command printing the body of `url` (python3 is in every banger image)."""
    return f"python3 -c \"import urllib.request as u; print(u.urlopen('{url}', timeout=20).read().decode())\""


def vm_ip(benv: BangerEnv, name: str) -> str:
    return str(json.loads(benv.cli("vm", "show", name, "--json", check=True).stdout)["ip"])


def test_guest_address_route_and_resolver(net_home: tuple[BangerEnv, Topology]) -> None:
    benv, _ = net_home
    addr = vm_ip(benv, "client")
    assert addr.startswith("172.30.77.")
    assert f"inet {addr}/24" in guest(benv, "client", "ip -4 addr show")
    assert "default via 172.30.77.1" in guest(benv, "client", "ip route")
    assert "nameserver 172.30.77.1" in guest(benv, "client", "cat /etc/resolv.conf")


def test_guest_reaches_gateway_and_other_vm_by_name(net_home: tuple[BangerEnv, Topology]) -> None:
    benv, _ = net_home
    resolved = guest(benv, "client", "python3 -c \"import socket; print(socket.gethostbyname('web.vm'))\"").strip()
    assert resolved == vm_ip(benv, "web")
    fetch = fetch_cmd("http://web.vm:8000/index.html")
    out = wait_for(lambda: guest(benv, "client", fetch, check=False), timeout=60, what="web.vm:8000 reachable")
    assert "hello-from-web" in out
    # The gateway answers (its DNS listens on TCP too).
    tcp = "python3 -c \"import socket; socket.create_connection(('172.30.77.1', 53), 5); print('ok')\""
    assert guest(benv, "client", tcp).strip() == "ok"


def test_guest_reaches_outside_through_nat(net_home: tuple[BangerEnv, Topology]) -> None:
    benv, topo = net_home
    fetch = fetch_cmd("http://10.99.0.2:8080/marker")
    assert "outside-world" in guest(benv, "client", fetch)
    # The outside server saw the host's uplink address, not the guest's: masquerade at work.
    log = topo.server_log.read_text()
    assert "10.99.0.1" in log and vm_ip(benv, "client") not in log


def test_host_resolves_vm_names_through_the_daemon(net_home: tuple[BangerEnv, Topology]) -> None:
    benv, topo = net_home
    assert ask(topo, "web.vm") == f"NOERROR ['{vm_ip(benv, 'web')}']\n"
    assert ask(topo, "nobody.vm").startswith("NXDOMAIN")


def test_port_forward(net_home: tuple[BangerEnv, Topology]) -> None:
    benv, topo = net_home
    # Published on every address (0.0.0.0): DNAT carries outside traffic (loopback is tests/vms/test_vm_tunnels.py).
    benv.cli("vm", "forward", "web", "0.0.0.0:8081:8000", check=True)
    for port in (8081, 8082):  # `vm forward` and `vm create --publish`
        url = f"http://10.99.0.1:{port}/index.html"
        out = subprocess.run(
            ["ip", "netns", "exec", topo.out, "curl", "-s", "--max-time", "20", url], capture_output=True, text=True
        )
        assert out.stdout == "hello-from-web\n", (port, out.stderr)
    status = json.loads(benv.cli("network", "status", "--json", check=True).stdout)
    assert "8081" in json.dumps(status)


def test_daemon_sigkill_and_rm_leave_nothing(net_home: tuple[BangerEnv, Topology]) -> None:
    """A VM of this test's own: it survives a daemon SIGKILL, and its removal leaves nothing of it behind."""
    benv, topo = net_home
    r = benv.cli(
        "vm", "create", "--name", "own", "--publish", "8083:8000", "--vcpus", "1", "--memory", "512", timeout=600
    )
    assert r.returncode == 0, r.stderr
    own = json.loads(benv.cli("vm", "show", "own", "--json", check=True).stdout)
    pid = benv.daemon_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: benv.daemon_pid() is None, what="daemon gone")
    benv.cli("daemon", "start", check=True)
    assert "ok" in guest(benv, "own", "python3 -c \"import socket; socket.gethostbyname('web.vm'); print('ok')\"")
    benv.cli("vm", "rename", "own", "own2", check=True)
    assert ask(topo, "own2.vm") == f"NOERROR ['{own['ip']}']\n"
    assert ask(topo, "own.vm").startswith("NXDOMAIN")
    tap = tap_name(own["id"])
    assert tap in ip("-n", topo.host, "-o", "link")
    benv.cli("vm", "rm", "-f", "own2", check=True, timeout=120)
    assert ask(topo, "own2.vm").startswith("NXDOMAIN")
    assert tap not in ip("-n", topo.host, "-o", "link")
    table = subprocess.run(
        ["ip", "netns", "exec", topo.host, "nft", "list", "table", "ip", "banger"], capture_output=True, text=True
    ).stdout
    assert "8083" not in table and f"dnat to {own['ip']}" not in table  # the published port went with its VM
    status = json.loads(benv.cli("network", "status", "--json", check=True).stdout)
    assert own["ip"] not in json.dumps(status["leases"])
