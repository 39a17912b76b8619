"""Root in a guest turns its agent against the host and floods the console (issue 9, items 11 and 16).

The agent is the VM's own agent.py with Credit.take patched to never wait (bind-mounted over the seed copy, then
the running agent killed so banger-init starts the patched one). The daemon must cut that connection off
instead of buffering, keep its memory bounded and keep serving; console.log must stay within its cap.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time

import pytest

from banger.drivers.consolelog import rotated
from tests.foundation.test_daemon import wait_for

from .conftest import CONSOLE_CAP_MIB, FaultEnv, rss_mib

pytestmark = [pytest.mark.vm, pytest.mark.faults]

SEED = "/run/banger/seed"
PATCH_AGENT = f"""
import pathlib
src = pathlib.Path("{SEED}/agent.py").read_text()
patch = '''
import protocol as _protocol

async def _take_without_waiting(self, n):
    self._available -= n
    return not self._closed

_protocol.Credit.take = _take_without_waiting
'''
marker = 'if __name__ == "__main__":'
pathlib.Path("/run/hostile-agent.py").write_text(src.replace(marker, patch + "\\n" + marker))
"""
# Generous: the issue measured +300 MB for this flood before the host enforced the window.
MAX_RSS_GROWTH_MIB = 150
# The agent's process name (guest/init.py forks it off PID 1 and names it; its children that do not exec share it,
# so the oldest is the agent).
AGENT_NAME = "banger-agent"
FLOOD_SECONDS = 12


def agent_pid(fe: FaultEnv, name: str) -> int | None:
    """The guest agent's pid; None while a request fails (the agent is down, or it just restarted)."""
    r = fe.cli("vm", "exec", name, "--", "pgrep", "-o", "-x", AGENT_NAME, timeout=120)
    return int(r.stdout.split()[0]) if r.returncode == 0 else None


def select_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> bool:
    """Whether `needle` appears on proc's stdout within `timeout` seconds (read raw: nothing sits in a buffer)."""
    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        seen = seen[-4096:] + chunk
    return True


class RssSampler(threading.Thread):
    """Samples a process's RSS until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, rss_mib(pid), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_mib(self.pid))


def test_hostile_agent_and_console_flood_are_bounded(fault_env: FaultEnv) -> None:
    fe, name = fault_env, "hostile"
    r = fe.cli("vm", "create", "--name", name, "--net", "none", "--vcpus", "1", "--memory", "384", timeout=600)
    assert r.returncode == 0, r.stderr
    try:
        # Root in the guest swaps in an agent that ignores credit.
        fe.cli("vm", "exec", name, "--", "python3", "-c", PATCH_AGENT, check=True)
        fe.cli("vm", "exec", name, "--", "mount", "--bind", "/run/hostile-agent.py", f"{SEED}/agent.py", check=True)
        # The seed ships the agent's bytecode (unchecked): hide it, so the next agent runs the patched source.
        fe.cli("vm", "exec", name, "--", "mkdir", "-p", "/run/no-bytecode", check=True)
        fe.cli("vm", "exec", name, "--", "mount", "--bind", "/run/no-bytecode", f"{SEED}/__pycache__", check=True)
        old = agent_pid(fe, name)
        fe.cli("vm", "exec", name, "--", "setsid", "-f", "sh", "-c", f"sleep 1; kill -9 {old}", check=True)
        assert old is not None
        wait_for(lambda: agent_pid(fe, name) not in (None, old), timeout=90, what="the patched agent to take over")
        daemon = fe.env.daemon_pid()
        assert daemon is not None
        sampler = RssSampler(daemon)
        before = sampler.peak
        sampler.start()
        try:
            # A slow reader: nothing is read from the CLI for 5 s while the guest pushes 300 MB.
            flood = fe.env.popen("vm", "exec", name, "--", "sh", "-c", "yes | head -c 300M")
            time.sleep(5)
            assert fe.cli("vm", "ls", "--json", timeout=60).returncode == 0  # the daemon answers meanwhile
            out, err = flood.communicate(timeout=300)
        finally:
            sampler.done.set()
            sampler.join()
        assert flood.returncode != 0 and "ignored flow control" in err, err
        assert len(out) < 300 * 1024 * 1024
        growth = sampler.peak - before
        print(f"daemon RSS {before:.0f} MiB, peak {sampler.peak:.0f} MiB during the exec flood")
        assert growth < MAX_RSS_GROWTH_MIB, f"daemon RSS grew by {growth:.0f} MiB"
        assert "ignored flow control" in fe.env.log_text()

        # The console: whatever the guest writes, console.log and its rotated half stay within the cap.
        log = fe.home / "vms" / fe.info(name)["id"] / "console.log"
        spew = f"yes 0123456789abcdefghijklmnopqrstuvwxyz | timeout {FLOOD_SECONDS} tee /dev/ttyS0 | wc -c"
        sampler = RssSampler(daemon)
        sampler.start()
        try:
            written = int(fe.cli("vm", "exec", name, "--", "sh", "-c", spew, timeout=300).stdout.split()[0])
        finally:
            sampler.done.set()
            sampler.join()
        print(f"guest wrote {written / 2**20:.1f} MiB to its console in {FLOOD_SECONDS}s")
        cap = CONSOLE_CAP_MIB * 2**20
        sizes = [p.stat().st_size for p in (log, rotated(log)) if p.exists()]
        assert written > cap and rotated(log).exists(), "the flood did not even fill the cap once"
        assert sum(sizes) <= cap, f"console logs hold {sizes} bytes, cap {cap}"
        assert sampler.peak - before < MAX_RSS_GROWTH_MIB
        for writer in fe.processes("banger.drivers.consolelog"):
            assert rss_mib(writer) < 64

        # `vm logs -f` follows the capped, rotated log: a line printed after the flood reaches it.
        follower = fe.env.popen("vm", "logs", "-f", "-n", "0", name)
        try:
            time.sleep(2)
            fe.cli("vm", "exec", name, "--", "sh", "-c", "echo after-the-flood > /dev/ttyS0", check=True)
            seen = select_line(follower, "after-the-flood", timeout=60)
        finally:
            follower.kill()
            follower.communicate()
        assert seen, "vm logs -f did not show the console line"

        # And the VM still serves small requests (within the window even for this agent).
        assert fe.cli("vm", "exec", name, "--", "echo", "alive", check=True).stdout == "alive\n"
        fe.check_consistent()
    finally:
        fe.cli("vm", "rm", "-f", name, timeout=120)
