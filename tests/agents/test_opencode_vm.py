"""The real opencode server (pinned npm platform binary) in a real guest under TCG with `-cpu max`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import BangerEnv

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]  # opencode under TCG on a busy host is slow

# Shared across runs: the 185 MB binary is fetched with npm once (the state root's cache is per test run).
OPENCODE_CACHE = Path("/var/cache/banger-tests/opencode-cache/agents")


def test_agent_vm_runs_a_healthy_opencode_server(vm_home: BangerEnv) -> None:
    OPENCODE_CACHE.mkdir(parents=True, exist_ok=True)
    agents = vm_home.home / "cache" / "agents"
    if not agents.exists():
        agents.symlink_to(OPENCODE_CACHE)
    r = vm_home.cli("vm", "create", "--name", "coder", "--agent", "opencode", "--net", "none", "--json", timeout=1200)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    try:
        assert info["state"] == "running" and info["vcpus"] == 2 and info["memory_mib"] == 2048
        assert info["agent"]["agent"] == "opencode" and info["agent"]["version"]
        rows = json.loads(vm_home.cli("session", "ls", "coder", "--json", check=True).stdout)
        server = next(r for r in rows if r["name"] == "opencode")
        assert (server["kind"], server["state"]) == ("agent", "running")
        assert server["command"][:2] == ["opencode", "serve"]
        # The server's password stays with the daemon: not in `vm show`, not in the guest's argv.
        password = json.loads(
            (Path(json.loads(vm_home.cli("vm", "show", "coder", "--json").stdout)["dir"]) / "agent.json").read_text()
        )["password"]
        assert password not in vm_home.cli("vm", "show", "coder", "--json", check=True).stdout
        ps = vm_home.cli("vm", "exec", "coder", "--", "ps", "-eo", "args", check=True).stdout
        assert "opencode serve" in ps and password not in ps
        # Bound to the guest's loopback only.
        ports = json.loads(vm_home.cli("vm", "ports", "coder", "--json", check=True).stdout)
        assert any(p["port"] == 4096 and p["address"] == "127.0.0.1" for p in ports)
    finally:
        vm_home.cli("vm", "rm", "-f", "coder", timeout=120)
