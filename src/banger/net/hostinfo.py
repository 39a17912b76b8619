"""Read-only views of the host's network state for `banger network status`, and setup advice for the host."""

from __future__ import annotations

import json
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

from banger import proc


def _netns_prefix(netns: str | None) -> list[str]:
    return [proc.which("ip"), "netns", "exec", netns] if netns else []


def bridge_state(name: str, netns: str | None = None) -> dict[str, Any]:
    """Whether the bridge exists and is up, with its MAC and MTU."""
    argv = [proc.which("ip"), "-j", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    done = proc.run(argv, check=False, step="inspect bridge")
    links = json.loads(done.stdout or b"[]") if done.returncode == 0 else []
    if not links:
        return {"present": False, "up": False}
    link = links[0]
    return {
        "present": True,
        "up": "UP" in link.get("flags", []),
        "mac": link.get("address"),
        "mtu": link.get("mtu"),
    }


def ip_forward(netns: str | None = None) -> str:
    """The current net.ipv4.ip_forward value ("0" or "1")."""
    argv = [*_netns_prefix(netns), proc.which("sysctl"), "-n", "net.ipv4.ip_forward"]
    return proc.run(argv, step="read ip_forward").stdout.decode().strip()


def host_instructions(gateway: IPv4Address, domain: str) -> str:
    """What to do, without systemd-resolved, so the host resolves *.domain through banger's DNS."""
    return (
        f"systemd-resolved is not running here, so banger cannot route *.{domain} on its own. "
        f"Send lookups under {domain} to {gateway}: with dnsmasq add `server=/{domain}/{gateway}`; "
        f"or put `nameserver {gateway}` first in /etc/resolv.conf (banger's DNS forwards other names "
        "to the upstream resolvers, but only while bangerd runs)."
    )


def listening_tcp_ports(netns: str | None = None) -> set[int]:
    """TCP ports some process on the host listens on (any address)."""
    argv = [proc.which("ss", hint="install the iproute2 package"), "-H", "-l", "-t", "-n"]
    if netns:
        argv[1:1] = ["-N", netns]
    out = proc.run(argv, step="list listening TCP ports").stdout.decode()
    ports: set[int] = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            _, _, port = fields[3].rpartition(":")
            if port.isdigit():
                ports.add(int(port))
    return ports


def run_all(commands: Sequence[Sequence[str]]) -> None:
    """Run host configuration commands (resolvectl ...) in order, stopping at the first failure."""
    for argv in commands:
        proc.run(argv, step="route DNS lookups to banger via systemd-resolved")
