"""Sessions in real guests (QEMU under TCG), driven through the real CLI and daemon."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import time
from typing import Any

import pytest

from tests.conftest import VENV_BIN, BangerEnv
from tests.foundation.test_daemon import process_gone, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

COUNTER = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done"


def create_vm(env: BangerEnv, name: str) -> str:
    # --net none: these tests run in the host's own namespace, which tests must never reconfigure.
    r = env.cli("vm", "create", "--name", name, "--net", "none", "--vcpus", "1", "--memory", "512", timeout=600)
    assert r.returncode == 0, r.stderr
    return name


@pytest.fixture(scope="module")
def vm(vm_home: BangerEnv) -> str:
    return create_vm(vm_home, "sessions")


def sessions(env: BangerEnv, vm: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(env.cli("session", "ls", vm, "--json", check=True, timeout=300).stdout)
    return {r["name"]: r for r in rows}


def logs(env: BangerEnv, vm: str, name: str) -> str:
    return env.cli("session", "logs", vm, name, check=True, timeout=300).stdout


def start(env: BangerEnv, vm: str, *args: str) -> str:
    r = env.cli("session", "start", vm, *args, check=True, timeout=600)
    return r.stdout.strip()


def test_counter_survives_cli_daemon_and_agent_restarts(vm_home: BangerEnv, vm: str) -> None:
    name = start(vm_home, vm, "--name", "counter", "--", "sh", "-c", COUNTER)
    assert name == "counter"
    assert sessions(vm_home, vm)["counter"]["state"] == "running"
    # A CLI following the output is killed: the session does not notice.
    follower = vm_home.popen("session", "logs", "-f", vm, "counter")
    assert follower.stdout is not None
    assert follower.stdout.readline().strip() == "1"
    follower.kill()
    follower.wait()
    # The daemon is SIGKILLed and a new one started; the guest keeps writing meanwhile.
    pid = vm_home.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), 20, "the daemon to die")
    time.sleep(2)
    vm_home.cli("daemon", "start", check=True)
    assert sessions(vm_home, vm)["counter"]["state"] == "running"
    # The agent itself is killed in the guest (banger-init starts a new one); the daemon reconnects.
    # The exec dies with its agent; how soon the CLI hears of it depends on how soon the new agent announces itself.
    vm_home.cli("vm", "exec", vm, "--", "sh", "-c", "kill -9 $PPID", timeout=600)
    wait_for(lambda: vm_home.cli("vm", "exec", vm, "--", "true", timeout=300).returncode == 0, 300, "the agent")
    before = len(logs(vm_home, vm, "counter").split())
    wait_for(lambda: len(logs(vm_home, vm, "counter").split()) > before + 5, 300, "output after the agent restart")
    stopped = json.loads(vm_home.cli("session", "stop", vm, "counter", "--json", check=True).stdout)
    assert (stopped["state"], stopped["signal"], stopped["exit_code"]) == ("exited", signal.SIGTERM, None)
    numbers = [int(x) for x in logs(vm_home, vm, "counter").split()]
    assert numbers == list(range(1, len(numbers) + 1))  # every line, none twice, across all of it
    assert len(numbers) > before
    assert sessions(vm_home, vm)["counter"]["output_bytes"] == sum(len(f"{n}\n") for n in numbers)
    vm_home.cli("session", "rm", vm, "counter", check=True)
    assert "counter" not in sessions(vm_home, vm)


def test_send_writes_stdin_and_eof_closes_it(vm_home: BangerEnv, vm: str) -> None:
    start(vm_home, vm, "--name", "reader", "--", "sh", "-c", 'while read l; do echo "got:$l"; done; echo bye')
    vm_home.cli("session", "send", vm, "reader", "hello world", check=True)
    vm_home.cli("session", "send", vm, "reader", "no-", "--no-newline", check=True)
    vm_home.cli("session", "send", vm, "reader", "newline", check=True)
    vm_home.cli("session", "send", vm, "reader", "--eof", check=True)
    follow = vm_home.cli("session", "logs", "-f", vm, "reader", timeout=600)
    assert follow.returncode == 0  # -f ends by itself when the session ends
    assert follow.stdout == "got:hello world\ngot:no-newline\nbye\n"
    row = wait_for(lambda: (r := sessions(vm_home, vm)["reader"])["state"] == "exited" and r, 300, "exited")
    assert (row["exit_code"], row["signal"], row["kind"], row["command"][0]) == (0, None, "process", "sh")
    bad = vm_home.cli("session", "send", vm, "reader", "late")
    assert bad.returncode == 1 and "not running" in bad.stderr
    vm_home.cli("session", "rm", vm, "reader", check=True)


def _read_until(fd: int, marker: bytes, buf: bytes, timeout: float = 300) -> bytes:
    deadline = time.monotonic() + timeout
    while marker not in buf:
        assert time.monotonic() < deadline, f"waiting for {marker!r}; got {buf[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            buf += os.read(fd, 4096)
    return buf


def test_attach_through_a_pty_detaches_and_leaves_it_running(vm_home: BangerEnv, vm: str) -> None:
    start(vm_home, vm, "--name", "shell", "-t", "--", "sh")
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a pseudo-terminal
        os.environ.update(vm_home.env)
        os.execv(str(VENV_BIN / "banger"), ["banger", "session", "attach", vm, "shell"])
    try:
        buf = _read_until(fd, b"Ctrl-] detaches", b"")
        time.sleep(1)  # the attach call is in place once the daemon streams; typing early is kept anyway
        os.write(fd, b"echo att-$((6*7)); stty size\r")
        buf = _read_until(fd, b"att-42", buf)
        os.write(fd, b"\x1d")  # Ctrl-]
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
    assert sessions(vm_home, vm)["shell"]["state"] == "running"
    assert "att-42" in logs(vm_home, vm, "shell")
    vm_home.cli("session", "rm", "-f", vm, "shell", check=True)


def test_restart_on_failure_brings_a_crashed_session_back(vm_home: BangerEnv, vm: str) -> None:
    start(vm_home, vm, "--name", "flaky", "--restart", "on-failure", "--", "sh", "-c", "echo run; sleep 1; exit 3")
    wait_for(lambda: logs(vm_home, vm, "flaky").count("run") >= 2, 300, "a restart")
    row = sessions(vm_home, vm)["flaky"]
    assert row["state"] == "running" and row["restarts"] >= 1 and row["restart"] == "on-failure"
    start(vm_home, vm, "--name", "fine", "--restart", "on-failure", "--", "sh", "-c", "echo once")
    row = wait_for(lambda: (r := sessions(vm_home, vm)["fine"])["state"] == "exited" and r, 300, "fine to exit")
    assert row["exit_code"] == 0 and row["restarts"] == 0 and logs(vm_home, vm, "fine") == "once\n"
    stopped = json.loads(vm_home.cli("session", "stop", vm, "flaky", "--signal", "KILL", "--json", check=True).stdout)
    assert stopped["state"] == "exited"
    for name in ("flaky", "fine"):
        vm_home.cli("session", "rm", vm, name, check=True)


def test_states_after_vm_restart_and_stop(vm_home: BangerEnv) -> None:
    vm = create_vm(vm_home, "sessions-restart")
    try:
        start(vm_home, vm, "--name", "exiter", "--", "sh", "-c", "echo done; exit 5")
        start(vm_home, vm, "--name", "sleeper", "--", "sh", "-c", "echo sleeping; exec sleep 1000")
        row = wait_for(lambda: (r := sessions(vm_home, vm)["exiter"])["state"] == "exited" and r, 300, "exited")
        assert row["exit_code"] == 5 and row["ended_at"]
        assert sessions(vm_home, vm)["sleeper"]["state"] == "running"
        dup = vm_home.cli("session", "start", vm, "--name", "sleeper", "--", "true")
        assert dup.returncode == 1 and "already" in dup.stderr
        wait_for(lambda: logs(vm_home, vm, "sleeper") == "sleeping\n", 300, "the sleeper's output")
        vm_home.cli("vm", "restart", vm, check=True, timeout=600)
        found = wait_for(lambda: (s := sessions(vm_home, vm))["sleeper"]["state"] == "lost" and s, 300, "lost")
        assert found["exiter"]["state"] == "exited" and found["exiter"]["exit_code"] == 5
        vm_home.cli("vm", "stop", vm, check=True, timeout=120)
        assert logs(vm_home, vm, "exiter") == "done\n"  # from the host's copy: the VM is stopped
        assert logs(vm_home, vm, "sleeper") == "sleeping\n"
        assert {r["state"] for r in sessions(vm_home, vm).values()} == {"exited", "lost"}
        gone = vm_home.cli("session", "logs", vm, "nope")
        assert gone.returncode == 1 and "no session named" in gone.stderr
    finally:
        vm_home.cli("vm", "rm", "-f", vm, timeout=120)
