"""Fixtures for network tests: throwaway network namespaces that are always deleted, and helpers to run in them."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from banger import proc
from banger.net.links import BridgeConfig, Links

GUEST_IP = "172.30.77.2"
UPLINK_HOST = "10.99.0.1"
UPLINK_OUTSIDE = "10.99.0.2"


class Namespaces:
    """Creates uniquely named namespaces and remembers them so teardown deletes every one."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.children: list[subprocess.Popen[bytes]] = []

    def new(self, role: str) -> str:
        """Create a namespace `banger-test-<role>-<random>` with loopback up."""
        name = f"banger-test-{role}-{secrets.token_hex(3)}"
        proc.run(["ip", "netns", "add", name], step="create test netns")
        self.names.append(name)
        proc.run(["ip", "-n", name, "link", "set", "lo", "up"], step="bring lo up")
        return name

    def ip(self, ns: str, *args: str) -> None:
        """Run `ip -n NS ARGS...`."""
        proc.run(["ip", "-n", ns, *args], step=f"ip {' '.join(args)}")

    def ip_json(self, ns: str, *args: str) -> Any:
        """`ip -j -n NS ARGS...` parsed."""
        return json.loads(proc.run(["ip", "-j", "-n", ns, *args], step="ip -j").stdout or b"[]")

    def exec(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside the namespace."""
        return proc.run(["ip", "netns", "exec", ns, *argv], **kwargs)

    def python(self, ns: str, code: str, *args: str, timeout: float = 20) -> str:
        """Run a Python snippet inside the namespace and return its stdout."""
        return self.exec(ns, [sys.executable, "-c", code, *args], timeout=timeout).stdout.decode()

    def spawn_python(self, ns: str, code: str, *args: str) -> subprocess.Popen[bytes]:
        """Start a long-running Python snippet in the namespace; it is killed at teardown."""
        child = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-u", "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.children.append(child)
        return child

    def veth(self, a_ns: str, a_name: str, b_ns: str, b_name: str) -> None:
        """A veth pair with one end in each namespace, both up."""
        tmp = f"bgt{secrets.token_hex(4)}"
        self.ip(a_ns, "link", "add", a_name, "type", "veth", "peer", "name", tmp)
        self.ip(a_ns, "link", "set", tmp, "netns", b_ns)
        self.ip(b_ns, "link", "set", tmp, "name", b_name)
        self.ip(a_ns, "link", "set", a_name, "up")
        self.ip(b_ns, "link", "set", b_name, "up")

    def topology(self) -> tuple[str, str, str]:
        """Namespaces (outside, host, guest): outside <-veth-> host with banger0 <-veth-> guest.

        The guest's veth peer, attached to the bridge, stands in for the TAP a real VM would use: the same
        bridge port behaviour, with a namespace behind it instead of a VMM.
        """
        outside, host, guest = self.new("out"), self.new("host"), self.new("guest")
        with Links(host) as links:
            links.ensure_bridge(BridgeConfig())
        self.veth(host, "uplink", outside, "eth0")
        self.ip(host, "addr", "add", f"{UPLINK_HOST}/24", "dev", "uplink")
        self.ip(outside, "addr", "add", f"{UPLINK_OUTSIDE}/24", "dev", "eth0")
        self.veth(host, "bg-guest1", guest, "eth0")
        self.ip(host, "link", "set", "bg-guest1", "master", "banger0")
        self.ip(guest, "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
        self.ip(guest, "route", "add", "default", "via", "172.30.77.1")
        return outside, host, guest

    @staticmethod
    def wait_line(child: subprocess.Popen[bytes]) -> str:
        """The first stdout line a child prints (its readiness signal); fails with its stderr if it died."""
        assert child.stdout is not None
        line = child.stdout.readline().decode().strip()
        if not line:
            child.kill()
            _, err = child.communicate()
            raise AssertionError(f"child exited before becoming ready: {err.decode()}")
        return line

    def close(self) -> None:
        """Kill children and delete every namespace created, reporting (not hiding) failures."""
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.communicate()
        errors: list[str] = []
        for name in self.names:
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            if done.returncode != 0:
                errors.append(f"{name}: {done.stderr.decode().strip()}")
        if errors:
            raise RuntimeError("failed to delete test namespaces: " + "; ".join(errors))


@pytest.fixture
def netns() -> Iterator[Namespaces]:
    """A namespace factory; everything it made is removed at teardown, even when the test failed."""
    if os.geteuid() != 0:
        pytest.fail("network tests need root and iproute2 (run them as root, as CI does)")
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.close()
