"""Upgrades: the daemon is identified by the code it runs; one running other code is replaced when safe, else
the CLI says what to do; status and stop work on any daemon; an autostarted daemon gets a clean environment."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger import __version__
from banger.daemon.lock import lock_holder
from banger.errors import ErrorCode
from tests.conftest import REPO, VENV_BIN, BangerEnv
from tests.foundation.test_daemon import process_gone, raw_call


@pytest.fixture(scope="module")
def other_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package with new modification times: the same version string, other code (a `git pull`)."""
    root = tmp_path_factory.mktemp("other-code")
    shutil.copytree(
        REPO / "src" / "banger",
        root / "banger",
        copy_function=shutil.copyfile,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return root


def start_other_daemon(env: BangerEnv, other_code: Path) -> int:
    """Start a daemon that runs `other_code` (as if the checkout moved on after it started)."""
    old = dict(env.env, PYTHONPATH=str(other_code))
    subprocess.run([str(VENV_BIN / "banger"), "daemon", "start"], env=old, check=True, timeout=60, capture_output=True)
    pid = env.daemon_pid()
    assert pid
    return pid


def status(env: BangerEnv) -> dict:  # type: ignore[type-arg]
    return json.loads(env.cli("daemon", "status", "--json", check=True).stdout)  # type: ignore[no-any-return]


def test_an_idle_daemon_of_other_code_is_replaced(banger_env: BangerEnv, other_code: Path) -> None:
    old_pid = start_other_daemon(banger_env, other_code)
    old = status(banger_env)
    mine = json.loads(banger_env.cli("version", "--json", check=True).stdout)
    assert old["build"] != mine["cli"]["build"] and mine["same_code"] is False
    assert "the daemon runs other code" in banger_env.cli("version", check=True).stdout
    r = banger_env.cli("vm", "ls", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    assert "restarted the daemon" in r.stderr
    assert process_gone(old_pid)
    new = status(banger_env)
    assert new["pid"] != old_pid and new["build"] == mine["cli"]["build"]


def test_a_busy_daemon_of_other_code_is_left_alone_with_instructions(banger_env: BangerEnv, other_code: Path) -> None:
    pid = start_other_daemon(banger_env, other_code)
    build = status(banger_env)["build"]
    busy = socket.socket(socket.AF_UNIX)
    busy.connect(str(banger_env.socket))
    f = busy.makefile("rwb")
    hello = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "rpc.hello",
        "params": {"version": __version__, "protocol": 1, "build": build},
    }
    sleep = {"jsonrpc": "2.0", "id": 2, "method": "daemon.sleep", "params": {"seconds": 120}}
    f.write(json.dumps(hello).encode() + b"\n" + json.dumps(sleep).encode() + b"\n")
    f.flush()
    assert json.loads(f.readline())["result"]["same_code"] is True  # a client of the daemon's own code
    try:
        deadline = time.monotonic() + 10
        while status(banger_env)["inflight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        r = banger_env.cli("vm", "ls")
        assert r.returncode != 0
        assert "runs other code" in r.stderr and "serving 1 call" in r.stderr and "banger daemon stop" in r.stderr
        assert banger_env.daemon_pid() == pid, "a busy daemon is not stopped under its callers"
        # status, version and stop work on it all the same.
        assert status(banger_env)["pid"] == pid
        assert banger_env.cli("version", check=True).stdout.startswith("cli:")
        banger_env.cli("daemon", "stop", check=True, timeout=60)
        assert process_gone(pid)
    finally:
        busy.close()


def test_status_and_stop_work_across_protocols(daemon: BangerEnv) -> None:
    pid = daemon.daemon_pid()
    replies = raw_call(
        daemon.socket,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "rpc.hello", "params": {"version": "9.9", "protocol": 99}},
            {"jsonrpc": "2.0", "id": 2, "method": "daemon.status"},
            {"jsonrpc": "2.0", "id": 3, "method": "vm.ls"},
            {"jsonrpc": "2.0", "id": 4, "method": "daemon.stop"},
        ],
    )
    assert replies[0]["error"]["code"] == ErrorCode.VERSION_MISMATCH
    assert "banger daemon stop" in replies[0]["error"]["message"]
    assert replies[1]["result"]["pid"] == pid
    assert replies[2]["error"]["code"] == ErrorCode.VERSION_MISMATCH
    assert replies[3]["result"]["stopping"] is True
    deadline = time.monotonic() + 30
    while pid and not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid and process_gone(pid)


@pytest.fixture
def leaky_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    home = tmp_path / "home"
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    env.pop("BANGER_NO_AUTOSTART", None)
    env.update(BANGER_HOME="home", BANGER_VMM="firecracker", BANGER_QEMU="./no-such-qemu", LEAK_CHECK="leaked")
    yield env, home
    pid = lock_holder(home / "run" / "bangerd.lock")
    if pid and pid > 0:
        os.kill(pid, 9)


def daemon_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_an_autostarted_daemon_does_not_inherit_the_cli_environment(
    leaky_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, home = leaky_env
    # Run from tmp_path with a relative BANGER_HOME: the daemon must not depend on where the CLI stood.
    r = subprocess.run(
        [str(VENV_BIN / "banger"), "vm", "ls", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    pid = lock_holder(home / "run" / "bangerd.lock")
    assert pid and pid > 0
    environ = daemon_environ(pid)
    assert environ["BANGER_HOME"] == str(home)
    assert not {"BANGER_VMM", "BANGER_QEMU", "LEAK_CHECK"} & set(environ), sorted(environ)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    doctor = subprocess.run(
        [str(VENV_BIN / "banger"), "doctor", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "no-such-qemu" not in doctor.stdout


def test_an_explicit_daemon_start_takes_the_shells_settings(
    leaky_env: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, home = leaky_env
    subprocess.run([str(VENV_BIN / "banger"), "daemon", "start"], env=env, cwd=tmp_path, check=True, timeout=60)
    pid = lock_holder(home / "run" / "bangerd.lock")
    assert pid and pid > 0
    environ = daemon_environ(pid)
    assert environ["BANGER_VMM"] == "firecracker" and "LEAK_CHECK" not in environ
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
