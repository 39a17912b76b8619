"""Tunnels with real QEMU guests: published ports on loopback (with and without a network), automatic forwards,
reverse tunnels, `vm proxy`, and OpenSSH (ssh, scp, rsync) through banger.

Topology (as in test_vm_network.py): namespace HOST runs bangerd; namespace OUT stands for another machine, joined
to HOST by a veth pair (HOST 10.99.0.1 <-> OUT 10.99.0.2). "Reachable from outside" is tested from OUT. The root
namespace is never touched. The SSH client's files go to a temporary HOME, never the real user's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BangerEnv
from tests.foundation.test_daemon import wait_for
from tests.vms.conftest import installed_home
from tests.vms.test_vm_network import Topology

pytestmark = [pytest.mark.vm, pytest.mark.net]

NOTE = "hello-through-the-tunnel"


class Lab:
    def __init__(self, benv: BangerEnv, topo: Topology, home: Path) -> None:
        self.benv, self.topo, self.home = benv, topo, home
        self.reverse_server: subprocess.Popen[bytes] | None = None

    def in_ns(self, ns: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout, env=self.benv.env
        )

    def curl(self, ns: str, url: str) -> str:
        """Body of `url` fetched from namespace `ns`, or '' when the connection fails."""
        r = self.in_ns(ns, "curl", "-s", "--max-time", "15", url)
        return r.stdout if r.returncode == 0 else ""

    def guest(self, name: str, script: str) -> str:
        r = self.benv.cli("vm", "exec", name, "--", "sh", "-c", script, timeout=120)
        assert r.returncode == 0, f"{script}: {r.stderr}"
        return r.stdout


def _serve(lab: Lab, name: str, port: int, text: str, bind: str = "127.0.0.1") -> None:
    lab.guest(
        name,
        f"mkdir -p /srv/{port} && cd /srv/{port} && echo {text} > index.html && "
        f"setsid python3 -m http.server {port} --bind {bind} >/dev/null 2>&1 < /dev/null & "
        # Python starts slowly under TCG: return once the server accepts connections.
        f"for i in $(seq 300); do bash -c 'echo > /dev/tcp/127.0.0.1/{port}' 2>/dev/null && exit 0; sleep 0.1; done; "
        "exit 1",
    )


@pytest.fixture(scope="module")
def lab(debian_kernel: Path, debian_image: Path) -> Iterator[Lab]:
    topo = Topology()
    topo.up()
    home = Path(tempfile.mkdtemp(prefix="bgssh"))
    try:
        with installed_home(debian_kernel, wrap=("ip", "netns", "exec", topo.host)) as benv:
            benv.env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
            lab = Lab(benv, topo, home)
            # A service on the host's loopback (in HOST) that the guest reaches through --reverse.
            www = home / "www"
            www.mkdir()
            (www / "host.txt").write_text("served-by-the-host\n")
            lab.reverse_server = subprocess.Popen(
                ["ip", "netns", "exec", topo.host, "python3", "-m", "http.server", "19401", "--bind", "127.0.0.1"],
                cwd=www,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            common = ["--vcpus", "1", "--memory", "512", "--timeout", "300"]
            creates = [
                benv.popen(
                    *("vm", "create", "--name", "nonet", "--net", "none", "--publish", "18081:8081"),
                    *("--reverse", "19400:19401", "--forward-ports", "auto", *common),
                ),
                benv.popen(
                    *("vm", "create", "--name", "br", "--publish", "18082:8081"),
                    *("--publish", "0.0.0.0:18083:8081", "--forward-ports", "off", *common),
                ),
            ]
            for p in creates:
                out, err = p.communicate(timeout=900)
                assert p.returncode == 0, err
            _serve(lab, "nonet", 8081, f"{NOTE}-nonet")
            # Outside traffic to a bridged VM's port published on a host address is DNAT'ed to the guest's own
            # address, so that server listens on every guest address (loopback is reached through the tunnel).
            _serve(lab, "br", 8081, f"{NOTE}-br", bind="0.0.0.0")
            yield lab
    finally:
        if "lab" in locals() and lab.reverse_server is not None:
            lab.reverse_server.kill()
            lab.reverse_server.wait()
        topo.down()
        shutil.rmtree(home, ignore_errors=True)


def test_publish_serves_loopback_with_no_network(lab: Lab) -> None:
    ns = lab.topo.host
    assert lab.curl(ns, "http://127.0.0.1:18081/index.html") == f"{NOTE}-nonet\n"
    assert lab.curl(lab.topo.out, "http://10.99.0.1:18081/index.html") == ""  # loopback only by default
    show = json.loads(lab.benv.cli("vm", "show", "nonet", "--json", check=True).stdout)
    assert [{k: p[k] for k in ("address", "host_port", "guest_port")} for p in show["publish"]] == [
        {"address": "127.0.0.1", "host_port": 18081, "guest_port": 8081}
    ]


def test_publish_with_bridge_loopback_and_all_addresses(lab: Lab) -> None:
    host, out = lab.topo.host, lab.topo.out
    assert lab.curl(host, "http://127.0.0.1:18082/index.html") == f"{NOTE}-br\n"
    assert lab.curl(out, "http://10.99.0.1:18082/index.html") == ""  # not on other addresses
    assert lab.curl(host, "http://127.0.0.1:18083/index.html") == f"{NOTE}-br\n"  # 0.0.0.0 serves loopback too
    assert lab.curl(out, "http://10.99.0.1:18083/index.html") == f"{NOTE}-br\n"  # ... and the host's addresses


def test_forward_adds_and_removes_and_clashes_are_clear(lab: Lab) -> None:
    benv, host = lab.benv, lab.topo.host
    r = benv.cli("vm", "forward", "br", "18081:8081")
    assert r.returncode == 1 and "host port 18081 is already published by VM nonet" in r.stderr
    taken = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            host,
            "python3",
            "-c",
            "import socket,time; s=socket.socket(); "
            "s.bind(('127.0.0.1', 18090)); s.listen(); print('ok', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert taken.stdout is not None and taken.stdout.readline() == "ok\n"
        r = benv.cli("vm", "forward", "br", "18090:8081")
        assert r.returncode == 1 and "host port 127.0.0.1:18090 is already in use" in r.stderr
        r = benv.cli("vm", "create", "--name", "clash", "--net", "none", "--publish", "18090:80", "--no-start")
        assert r.returncode == 1 and "already in use" in r.stderr
        assert "clash" not in benv.cli("vm", "ls", check=True).stdout  # nothing half-made
    finally:
        taken.kill()
        taken.wait()
    rows = json.loads(benv.cli("vm", "forward", "br", "18084:8081", "--json", check=True).stdout)
    assert {"address": "127.0.0.1", "host_port": 18084, "guest_port": 8081, "proto": "tcp"} in rows
    assert lab.curl(host, "http://127.0.0.1:18084/index.html") == f"{NOTE}-br\n"
    benv.cli("vm", "forward", "br", "18084:8081", "--remove", check=True)
    assert lab.curl(host, "http://127.0.0.1:18084/index.html") == ""


def test_auto_forward_follows_the_guest_listener(lab: Lab) -> None:
    host = lab.topo.host
    _serve(lab, "nonet", 18095, "auto-forwarded")
    url = "http://127.0.0.1:18095/index.html"
    wait_for(lambda: lab.curl(host, url) == "auto-forwarded\n", timeout=30, what="auto-forward appears")
    ports = json.loads(lab.benv.cli("vm", "ports", "nonet", "--json", check=True).stdout)
    assert any(p["port"] == 18095 and p["host_port"] == 18095 for p in ports)
    lab.guest("nonet", "pkill -f 'http[.]server 18095'")
    wait_for(lambda: lab.curl(host, url) == "", timeout=30, what="auto-forward goes away")
    # --forward-ports off: the guest's 8081 is not forwarded automatically.
    assert lab.curl(host, "http://127.0.0.1:8081/index.html") == ""


def test_reverse_tunnel_reaches_host_loopback_without_network(lab: Lab) -> None:
    fetch = (
        "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:19400/host.txt').read().decode())\""
    )
    out = wait_for(lambda: _try(lab, "nonet", fetch), timeout=30, what="reverse tunnel answers")
    assert "served-by-the-host" in out


def _try(lab: Lab, name: str, script: str) -> str:
    r = lab.benv.cli("vm", "exec", name, "--", "sh", "-c", script, timeout=60)
    return r.stdout if r.returncode == 0 else ""


def test_vm_proxy_joins_stdio_to_a_guest_port(lab: Lab) -> None:
    request = "GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n"
    r = lab.benv.cli("vm", "proxy", "nonet.vm", "8081", input=request, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("HTTP/1.0 200") and r.stdout.endswith(f"{NOTE}-nonet\n")
    r = lab.benv.cli("vm", "proxy", "nonet", "9", input="", timeout=60)
    assert r.returncode == 1 and "nothing accepts connections on guest port 9" in r.stderr


def _ssh_config(lab: Lab) -> Path:
    cfg = lab.home / "ssh_config"
    cfg.write_text(lab.benv.cli("ssh-config", check=True).stdout)
    return cfg


def test_openssh_client_ssh_scp_rsync(lab: Lab) -> None:
    cfg = _ssh_config(lab)
    text = cfg.read_text()
    assert text.startswith("Host *.vm\n") and "vm proxy %h 22" in text and "StrictHostKeyChecking yes" in text
    key = lab.home / ".config" / "banger" / "ssh" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    env = lab.benv.env
    r = subprocess.run(
        ["ssh", "-F", str(cfg), "nonet.vm", "true"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["ssh", "-F", str(cfg), "nonet.vm", "hostname"], capture_output=True, text=True, env=env)
    assert r.stdout == "nonet\n"
    local = lab.home / "up.bin"
    local.write_bytes(os.urandom(300_000))
    subprocess.run(["scp", "-F", str(cfg), str(local), "nonet.vm:/tmp/up.bin"], check=True, env=env, timeout=120)
    back = lab.home / "down.bin"
    subprocess.run(["scp", "-F", str(cfg), "nonet.vm:/tmp/up.bin", str(back)], check=True, env=env, timeout=120)
    assert back.read_bytes() == local.read_bytes()
    tree = lab.home / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("rsynced\n")
    ssh = f"ssh -F {cfg}"
    subprocess.run(["rsync", "-a", "-e", ssh, f"{tree}/", "nonet.vm:/tmp/tree/"], check=True, env=env, timeout=120)
    assert lab.guest("nonet", "cat /tmp/tree/sub/a.txt") == "rsynced\n"
    # `vm ssh` runs the same client and exits with its exit code (the command is the remote shell's, as in ssh).
    r = lab.benv.cli("vm", "ssh", "nonet", "--", "echo via-vm-ssh; exit 3", timeout=120)
    assert (r.returncode, r.stdout) == (3, "via-vm-ssh\n"), r.stderr


def test_changed_host_key_is_refused(lab: Lab) -> None:
    cfg = _ssh_config(lab)
    env = lab.benv.env
    r = subprocess.run(["ssh", "-F", str(cfg), "br.vm", "true"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    swap = (
        "mkdir -p /root/keys.bak && cp -a /etc/ssh/ssh_host_* /root/keys.bak/ && rm /etc/ssh/ssh_host_* && "
        "ssh-keygen -A >/dev/null && kill -HUP $(cat /run/sshd.pid) && sleep 1"
    )
    lab.guest("br", swap)
    try:
        r = subprocess.run(["ssh", "-F", str(cfg), "br.vm", "true"], capture_output=True, text=True, env=env)
        assert r.returncode == 255 and "Host key verification failed" in r.stderr
    finally:
        lab.guest("br", "cp -a /root/keys.bak/* /etc/ssh/ && kill -HUP $(cat /run/sshd.pid) && sleep 1")


def test_daemon_restart_listens_again(lab: Lab) -> None:
    benv = lab.benv
    pid = benv.daemon_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: benv.daemon_pid() is None, what="daemon gone")
    benv.cli("daemon", "start", check=True)
    out = wait_for(lambda: lab.curl(lab.topo.host, "http://127.0.0.1:18081/index.html"), timeout=60, what="re-listened")
    assert out == f"{NOTE}-nonet\n"
