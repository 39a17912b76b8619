"""banger-init's network step (guest/init.py configure_network): one `ip -batch` run, in a real namespace.

The guest's interfaces are veth links in a namespace this test creates; banger-init's code runs inside it as it
would in the guest, with the host's own iproute2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .conftest import Namespaces

CONFIGURE = """
import json, sys
from banger.guest import init
if len(sys.argv) > 2:
    init.DEFAULT_PATH = sys.argv[2]  # where banger-init looks for `ip`
init.configure_network(json.loads(sys.argv[1]))
"""


def test_batch_renames_addresses_and_routes_the_interfaces(netns: Namespaces) -> None:
    ns = netns.new("ginit")
    netns.ip(ns, "link", "add", "ens9", "address", "02:ab:00:00:00:01", "type", "veth", "peer", "name", "peer9")
    netns.ip(ns, "link", "add", "ens11", "address", "02:ab:00:00:00:03", "type", "veth", "peer", "name", "peer11")
    network = {
        "interfaces": [
            {
                "name": "eth0",
                "mac": "02:ab:00:00:00:01",
                "address": "10.77.0.2",
                "prefix": 24,
                "gateway": "10.77.0.1",
                "mtu": 1400,
            },
            {
                "name": "eth1",
                "mac": "02:ab:00:00:00:03",
                "address": "fd00:77::2",
                "prefix": 64,
                "gateway": "fd00:77::1",
            },
        ]
    }
    out = netns.python(ns, CONFIGURE, json.dumps(network))
    assert "warning" not in out, out
    (link,) = netns.ip_json(ns, "link", "show", "dev", "eth0")
    assert link["address"] == "02:ab:00:00:00:01" and link["mtu"] == 1400 and "UP" in link["flags"]
    (addr,) = netns.ip_json(ns, "-4", "address", "show", "dev", "eth0")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.77.0.2", 24)]
    routes = netns.ip_json(ns, "-4", "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.77.0.1", "eth0")]
    routes6 = netns.ip_json(ns, "-6", "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes6] == [("fd00:77::1", "eth1")]  # the family from the gateway
    (lo,) = netns.ip_json(ns, "link", "show", "dev", "lo")
    assert "UP" in lo["flags"]


def test_a_failed_command_is_reported_and_the_rest_still_run(netns: Namespaces) -> None:
    ns = netns.new("ginit")
    netns.ip(ns, "link", "set", "lo", "down")
    netns.ip(ns, "link", "add", "ens10", "address", "02:ab:00:00:00:02", "type", "veth", "peer", "name", "peer10")
    network = {
        "interfaces": [
            # No NIC has this MAC: its commands fail, as they did one by one before the batch.
            {"name": "eth1", "mac": "02:ab:00:00:00:99", "address": "10.78.0.2", "prefix": 24},
            {"name": "eth0", "mac": "02:ab:00:00:00:02", "address": "10.77.0.2", "prefix": 24},
        ]
    }
    out = netns.python(ns, CONFIGURE, json.dumps(network))
    assert "banger-init: warning: network setup failed" in out and "eth1" in out, out
    (addr,) = netns.ip_json(ns, "-4", "address", "show", "dev", "eth0")
    assert [a["local"] for a in addr["addr_info"]] == ["10.77.0.2"]
    (lo,) = netns.ip_json(ns, "link", "show", "dev", "lo")
    assert "UP" in lo["flags"]


def test_busybox_ip_gets_one_run_per_command(netns: Namespaces, tmp_path: Path) -> None:
    # Images whose only `ip` is busybox's: it has no -batch, so each command runs on its own as before.
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "ip").symlink_to(shutil.which("busybox") or "/bin/busybox")
    ns = netns.new("ginit")
    netns.ip(ns, "link", "set", "lo", "down")
    netns.ip(ns, "link", "add", "ens12", "address", "02:ab:00:00:00:04", "type", "veth", "peer", "name", "peer12")
    network = {"interfaces": [{"name": "eth0", "mac": "02:ab:00:00:00:04", "address": "10.79.0.2", "prefix": 24}]}
    out = netns.python(ns, CONFIGURE, json.dumps(network), str(tools))
    assert "warning" not in out, out
    (addr,) = netns.ip_json(ns, "-4", "address", "show", "dev", "eth0")
    assert [a["local"] for a in addr["addr_info"]] == ["10.79.0.2"]
    (lo,) = netns.ip_json(ns, "link", "show", "dev", "lo")
    assert "UP" in lo["flags"]


REIDENTIFY = """
import json, sys
from banger.guest import reidentify
print(json.dumps(reidentify.set_network(json.loads(sys.argv[1]))))
"""


def test_a_clone_moves_its_interface_to_the_new_mac_and_address_in_one_batch(netns: Namespaces) -> None:
    # guest/reidentify.py's network step, as a restored clone runs it: the interface keeps its name (eth0) and
    # takes the clone's MAC, address and default route, with one `ip -batch` run.
    ns = netns.new("gclone")
    netns.ip(ns, "link", "add", "eth0", "address", "02:ab:00:00:00:10", "type", "veth", "peer", "name", "peer0")
    netns.ip(ns, "address", "add", "10.80.0.5/24", "dev", "eth0")  # the snapshot's address
    net = {"name": "eth0", "mac": "02:ab:00:00:00:11", "address": "10.80.0.6", "prefix": 24, "gateway": "10.80.0.1"}
    assert json.loads(netns.python(ns, REIDENTIFY, json.dumps(net))) == []
    (link,) = netns.ip_json(ns, "link", "show", "dev", "eth0")
    assert link["address"] == "02:ab:00:00:00:11" and "UP" in link["flags"]
    (addr,) = netns.ip_json(ns, "-4", "address", "show", "dev", "eth0")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.80.0.6", 24)]
    routes = netns.ip_json(ns, "-4", "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.80.0.1", "eth0")]
    # An interface the clone does not have: the failures are reported, not hidden.
    problems = json.loads(netns.python(ns, REIDENTIFY, json.dumps({**net, "name": "eth9"})))
    assert problems and "eth9" in " ".join(problems), problems
