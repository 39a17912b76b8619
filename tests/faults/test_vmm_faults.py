"""A guest's agent killed, its kernel panicking, its VMM SIGKILLed behind banger's back (issue 9, item 15)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from banger.net.links import tap_name
from tests.foundation.test_daemon import wait_for

from .conftest import FaultEnv

pytestmark = [pytest.mark.vm, pytest.mark.faults]

# The agent's process name (guest/init.py forks it off PID 1 and names it; its children that do not exec share it,
# so the oldest is the agent).
AGENT_NAME = "banger-agent"


def agent_pid(fe: FaultEnv, name: str) -> int | None:
    """The guest agent's pid; None while a request fails (the agent is down, or it just restarted)."""
    r = fe.cli("vm", "exec", name, "--", "pgrep", "-o", "-x", AGENT_NAME, timeout=120)
    if r.returncode != 0:
        assert "agent restarted" in r.stderr or "agent" in r.stderr, r.stderr
        return None
    return int(r.stdout.split()[0])


def wait_state(fe: FaultEnv, name: str, state: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    return wait_for(  # type: ignore[no-any-return]
        lambda: (info := fe.info(name))["state"] == state and info, timeout=timeout, what=f"{name} to be {state}"
    )


def assert_unplugged(fe: FaultEnv, vm: dict) -> None:  # type: ignore[type-arg]
    assert tap_name(vm["id"]) not in fe.taps()
    rules = fe.ruleset()
    assert tap_name(vm["id"]) not in rules and f"{vm['ip']} " not in rules
    assert not [p for p in (fe.home / "run" / vm["id"]).glob("*") if p.is_socket()]


def test_guest_faults_end_cleanly_and_the_vm_starts_again(fault_env: FaultEnv) -> None:
    fe, name = fault_env, "crashy"
    r = fe.cli("vm", "create", "--name", name, "--vcpus", "1", "--memory", "384", timeout=600)
    assert r.returncode == 0, r.stderr
    try:
        # 1. The agent killed inside the guest: banger-init restarts it, the VMM stays, the daemon reconnects.
        vmm, old_agent = fe.info(name)["pid"], agent_pid(fe, name)
        assert old_agent is not None
        kill = f"sleep 1; kill -9 {old_agent}"
        fe.cli("vm", "exec", name, "--", "setsid", "-f", "sh", "-c", kill, check=True)
        wait_for(lambda: agent_pid(fe, name) not in (None, old_agent), timeout=90, what="a restarted agent")
        assert fe.info(name)["state"] == "running" and fe.info(name)["pid"] == vmm
        assert fe.cli("vm", "exec", name, "--", "echo", "reconnected", check=True).stdout == "reconnected\n"

        # 2. A kernel panic: the VMM ends (panic=1, -no-reboot); the VM says why and its network is gone.
        vm = fe.info(name)
        panic = fe.cli("vm", "exec", name, "--", "sh", "-c", "echo c > /proc/sysrq-trigger", timeout=120)
        assert panic.returncode != 0
        crashed = wait_state(fe, name, "error")
        assert "kernel panic" in crashed["reason"].lower(), crashed["reason"]
        assert_unplugged(fe, vm)
        fe.check_consistent()
        fe.cli("vm", "start", name, "--timeout", "300", check=True, timeout=600)
        assert fe.cli("vm", "exec", name, "--", "echo", "after-panic", check=True).stdout == "after-panic\n"

        # 3. The VMM SIGKILLed behind banger's back: same.
        vm = fe.info(name)
        os.kill(vm["pid"], signal.SIGKILL)
        killed = wait_state(fe, name, "error")
        assert "exited unexpectedly" in killed["reason"]
        assert_unplugged(fe, vm)
        fe.check_consistent()
        t0 = time.monotonic()
        fe.cli("vm", "start", name, "--timeout", "300", check=True, timeout=600)
        assert fe.cli("vm", "exec", name, "--", "echo", "after-kill", check=True).stdout == "after-kill\n"
        print(f"restart after SIGKILL took {time.monotonic() - t0:.1f}s")
        fe.check_consistent()
    finally:
        fe.cli("vm", "rm", "-f", name, timeout=120)
