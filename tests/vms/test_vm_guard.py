"""Guests in their lane with real QEMU guests, inside network namespaces the test creates (see test_vm_network's
topology): host services closed unless --allow-host, spoofing dropped, --isolate, --egress deny, network_policy."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BangerEnv
from tests.foundation.test_daemon import wait_for
from tests.vms.conftest import installed_home
from tests.vms.test_vm_network import Topology, fetch_cmd, vm_ip

pytestmark = [pytest.mark.vm, pytest.mark.net]

GATEWAY = "172.30.77.1"


def connects(benv: BangerEnv, name: str, host: str, port: int, source: str | None = None) -> bool:
    """Whether a TCP connection from the guest (optionally from a given source address) succeeds."""
    bind = f"s.bind(('{source}', 0)); " if source else ""
    code = f"import socket; s = socket.socket(); s.settimeout(3); {bind}s.connect(('{host}', {port})); print('ok')"
    r = benv.cli("vm", "exec", name, "--", "python3", "-c", code, timeout=120)
    return r.returncode == 0 and r.stdout.strip() == "ok"


@pytest.fixture(scope="module")
def lanes(debian_kernel: Path, debian_image: Path) -> Iterator[tuple[BangerEnv, Topology]]:
    topo = Topology()
    topo.up()
    # A host service on every host address, port 9999: guests must not reach it unless allowed.
    service = subprocess.Popen(
        ["ip", "netns", "exec", topo.host, sys.executable, "-m", "http.server", "9999", "--bind", "0.0.0.0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/tmp",
    )
    try:
        with installed_home(debian_kernel, wrap=("ip", "netns", "exec", topo.host)) as benv:
            for name, extra in (
                ("plain", []),
                ("strict", ["--allow-host", "9999", "--egress", "deny", "--isolate"]),
            ):
                r = benv.cli("vm", "create", "--name", name, *extra, "--vcpus", "1", "--memory", "512", timeout=600)
                assert r.returncode == 0, r.stderr
            yield benv, topo
    finally:
        service.kill()
        service.wait()
        topo.down()


def test_policy_is_shown(lanes: tuple[BangerEnv, Topology]) -> None:
    benv, _ = lanes
    shown = json.loads(benv.cli("vm", "show", "strict", "--json", check=True).stdout)["network_policy"]
    assert shown == {"allow_host": [9999], "isolate": True, "egress": "deny", "allow_domains": [], "allow_cidrs": []}
    plain = json.loads(benv.cli("vm", "show", "plain", "--json", check=True).stdout)["network_policy"]
    assert plain["egress"] == "allow" and plain["allow_host"] == [] and plain["isolate"] is False
    bad = benv.cli("vm", "create", "--name", "bad", "--egress", "deny", "--allow-domain", "example.org", "--no-start")
    assert bad.returncode == 1 and "allowlist" in bad.stderr
    assert "bad" not in benv.cli("vm", "ls").stdout


def test_host_services_only_with_allow_host(lanes: tuple[BangerEnv, Topology]) -> None:
    benv, _ = lanes
    assert not connects(benv, "plain", GATEWAY, 9999)
    assert not connects(benv, "plain", "10.99.0.1", 9999)  # nor through the host's other addresses
    assert connects(benv, "plain", GATEWAY, 53)  # banger's DNS is there for everyone
    assert connects(benv, "strict", GATEWAY, 9999)


def test_spoofed_source_is_dropped(lanes: tuple[BangerEnv, Topology]) -> None:
    benv, _ = lanes
    benv.cli("vm", "exec", "plain", "--", "ip", "addr", "add", "172.30.77.99/24", "dev", "eth0", check=True)
    try:
        assert connects(benv, "plain", GATEWAY, 53, source=vm_ip(benv, "plain"))
        assert not connects(benv, "plain", GATEWAY, 53, source="172.30.77.99")
    finally:
        benv.cli("vm", "exec", "plain", "--", "ip", "addr", "del", "172.30.77.99/24", "dev", "eth0")


def test_egress_deny_and_isolate(lanes: tuple[BangerEnv, Topology]) -> None:
    benv, _ = lanes
    outside = fetch_cmd("http://10.99.0.2:8080/marker")
    assert "outside-world" in benv.cli("vm", "exec", "plain", "--", "sh", "-c", outside, check=True).stdout
    assert not connects(benv, "strict", "10.99.0.2", 8080)
    # Names of VMs still resolve for a guest without egress.
    lookup = "import socket; print(socket.gethostbyname('plain.vm'))"
    assert benv.cli("vm", "exec", "strict", "--", "python3", "-c", lookup, check=True).stdout.strip() == vm_ip(
        benv, "plain"
    )
    # --isolate: no traffic between strict and any other VM, either way.
    benv.cli(
        "vm", "exec", "strict", "--", "sh", "-c",
        "setsid python3 -m http.server 8000 >/dev/null 2>&1 < /dev/null & sleep 0.5", check=True,
    )  # fmt: skip
    wait_for(lambda: connects(benv, "strict", "127.0.0.1", 8000), timeout=60, what="the guest's server")
    assert not connects(benv, "plain", vm_ip(benv, "strict"), 8000)
    assert not connects(benv, "strict", vm_ip(benv, "plain"), 22)
