"""bangerd as a real process on a real socket: lifecycle, one-per-root, SIGKILL recovery, cancellation."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from banger.errors import ErrorCode
from banger.rpc.client import Client
from tests.conftest import VENV_BIN, BangerEnv


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Wait for an external process's state to change (bounded); returns the predicate's value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def process_gone(pid: int) -> bool:
    """True when pid no longer runs (gone, or a zombie waiting for its reaper)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line.rsplit(")", 1)[1].split()[0] == "Z"


def raw_call(sock_path: Path, lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    """Send raw JSON-RPC lines and collect one reply per request."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    f = s.makefile("rwb")
    out = []
    for msg in lines:
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        out.append(json.loads(f.readline()))
    s.close()
    return out


def test_start_status_stop(banger_env: BangerEnv) -> None:
    r = banger_env.cli("daemon", "status")
    assert r.returncode == 3 and "not running" in r.stdout
    banger_env.cli("daemon", "start", check=True)
    status = json.loads(banger_env.cli("daemon", "status", "--json", check=True).stdout)
    assert status["running"] is True
    assert status["home"] == str(banger_env.home)
    assert status["schema_version"] >= 1
    mode = stat.S_IMODE(os.stat(banger_env.socket).st_mode)
    assert mode & 0o007 == 0, f"socket is world-accessible: {oct(mode)}"
    pid = status["pid"]
    banger_env.cli("daemon", "stop", check=True)
    assert process_gone(pid)
    assert not banger_env.socket.exists()
    assert "bangerd stopped" in banger_env.log_text()


def test_second_daemon_refused(daemon: BangerEnv) -> None:
    proc = subprocess.run([str(VENV_BIN / "bangerd")], env=daemon.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    # the first daemon is untouched and still answers
    assert daemon.cli("daemon", "status").returncode == 0


def test_restart_after_sigkill(daemon: BangerEnv) -> None:
    pid = daemon.daemon_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: daemon.daemon_pid() is None, what="lock release after SIGKILL")
    assert daemon.socket.exists(), "a SIGKILLed daemon leaves its socket behind (the case under test)"
    assert daemon.cli("daemon", "status").returncode == 3
    daemon.cli("daemon", "start", check=True)
    new_pid = daemon.daemon_pid()
    assert new_pid and new_pid != pid


def test_autostart_and_opt_out(banger_env: BangerEnv) -> None:
    env = dict(banger_env.env, BANGER_NO_AUTOSTART="1")
    proc = subprocess.run(
        [str(VENV_BIN / "banger"), "daemon", "sleep", "0"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: the banger daemon is not running")
    assert banger_env.daemon_pid() is None
    r = banger_env.cli("daemon", "sleep", "0", check=True)
    assert "slept" in r.stdout
    assert banger_env.daemon_pid() is not None


def test_round_trip_and_progress_notifications(daemon: BangerEnv) -> None:
    events: list[dict] = []  # type: ignore[type-arg]
    with Client(daemon.socket) as client:
        result = client.call("daemon.sleep", {"seconds": 2.2}, on_notify=lambda m, p: events.append(p))
    assert result == {"slept": 2.2}
    steps = [e["event"]["done"] for e in events]
    assert len(steps) >= 3 and steps == sorted(steps)


def test_errors_unknown_method_bad_params_version(daemon: BangerEnv) -> None:
    from banger import __version__

    mismatch = raw_call(
        daemon.socket,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "rpc.hello", "params": {"version": "0.0.0-old", "protocol": 1}},
            {"jsonrpc": "2.0", "id": 2, "method": "daemon.sleep", "params": {"seconds": 0.1}},
        ],
    )
    assert mismatch[0]["result"]["same_code"] is False  # other code: seen and stoppable (tests/foundation/test_upgrade)
    assert mismatch[1]["error"]["code"] == ErrorCode.VERSION_MISMATCH
    assert "banger daemon stop" in mismatch[1]["error"]["message"]
    hello = {"jsonrpc": "2.0", "id": 1, "method": "rpc.hello", "params": {"version": __version__, "protocol": 1}}
    replies = raw_call(
        daemon.socket,
        [
            hello,
            {"jsonrpc": "2.0", "id": 2, "method": "nope.never"},
            {"jsonrpc": "2.0", "id": 3, "method": "daemon.sleep", "params": {"seconds": "soon"}},
            {"jsonrpc": "2.0", "id": 4, "method": "daemon.sleep", "params": {"bogus": 1}},
            {"jsonrpc": "2.0", "id": 5, "method": "daemon.status", "params": [1]},
            {"jsonrpc": "2.0", "id": 6, "method": "daemon.sleep", "params": {"seconds": float("inf")}},
        ],
    )
    assert "result" in replies[0]
    assert replies[1]["error"]["code"] == ErrorCode.METHOD_NOT_FOUND
    assert replies[2]["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert "'seconds' must be float" in replies[2]["error"]["message"]
    assert replies[3]["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert replies[4]["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert replies[5]["error"]["code"] == ErrorCode.INVALID_PARAMS


def test_cancel_right_behind_the_call_still_gets_a_reply(daemon: BangerEnv) -> None:
    from banger import __version__

    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    f = s.makefile("rwb")
    msgs = [
        {"jsonrpc": "2.0", "id": 1, "method": "rpc.hello", "params": {"version": __version__, "protocol": 1}},
        {"jsonrpc": "2.0", "id": 2, "method": "daemon.sleep", "params": {"seconds": 60}},
        {"jsonrpc": "2.0", "method": "$/cancel", "params": {"id": 2}},
    ]
    f.write(b"".join(json.dumps(m).encode() + b"\n" for m in msgs))  # one write: the cancel beats the task
    f.flush()
    s.settimeout(10)
    replies = [json.loads(f.readline()) for _ in range(2)]
    s.close()
    assert replies[1]["id"] == 2 and replies[1]["error"]["code"] == ErrorCode.CANCELLED


def _inflight(daemon: BangerEnv) -> int:
    with Client(daemon.socket) as c:
        return int(c.call("daemon.status")["inflight"])


def test_client_disconnect_cancels_handler(daemon: BangerEnv) -> None:
    client = Client(daemon.socket)
    client.connect()
    client._send(b'{"jsonrpc":"2.0","id":7,"method":"daemon.sleep","params":{"seconds":3600}}\n')
    wait_for(lambda: _inflight(daemon) == 1, what="sleep call to be in flight")
    client.close()
    wait_for(lambda: _inflight(daemon) == 0, what="handler cancelled after disconnect")
    assert "daemon.sleep 7: cleanup ran" in daemon.log_text()


def test_ctrl_c_in_cli_cancels_in_daemon(daemon: BangerEnv) -> None:
    proc = daemon.popen("daemon", "sleep", "3600")
    wait_for(lambda: _inflight(daemon) == 1, what="CLI call to be in flight")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in err
    wait_for(lambda: "cleanup ran" in daemon.log_text(), what="cleanup log line")
    assert _inflight(daemon) == 0


def test_graceful_stop_cancels_inflight(daemon: BangerEnv) -> None:
    proc = daemon.popen("daemon", "sleep", "3600")
    wait_for(lambda: _inflight(daemon) == 1, what="call in flight")
    daemon.cli("daemon", "stop", check=True)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "cancelled" in err
    assert "cleanup ran" in daemon.log_text()


def test_usage_error_exit_2(banger_env: BangerEnv) -> None:
    r = banger_env.cli("daemon", "frobnicate")
    assert r.returncode == 2
    assert "No such command" in r.stderr


def test_version_json(daemon: BangerEnv) -> None:
    info = json.loads(daemon.cli("version", "--json", check=True).stdout)
    assert info["cli"]["version"] == info["daemon"]["version"]
    assert info["cli"]["commit"] and len(info["cli"]["commit"]) == 40
    plain = daemon.cli("version", check=True).stdout
    assert plain.startswith("cli:") and "daemon:" in plain


def test_bangerd_version_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "banger.daemon.main", "--version"], capture_output=True, text=True)
    assert out.stdout.startswith("bangerd ")
