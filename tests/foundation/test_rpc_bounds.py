"""A client that floods the daemon with calls or input is limited; the daemon's memory stays bounded."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from banger import __version__, errors
from banger.errors import ErrorCode
from banger.rpc import protocol
from banger.rpc.client import Client
from banger.rpc.server import MAX_CALLS_PER_CONNECTION, MAX_INPUT_BYTES
from tests.conftest import BangerEnv
from tests.foundation.test_daemon import wait_for

MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def hello_socket(path: Path) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    f = s.makefile("rwb")
    hello = {"jsonrpc": "2.0", "id": 0, "method": "rpc.hello", "params": {"version": __version__, "protocol": 1}}
    f.write(json.dumps(hello).encode() + b"\n")
    f.flush()
    assert "result" in json.loads(f.readline())
    return s, f


def test_too_many_calls_on_one_connection_are_refused(daemon: BangerEnv) -> None:
    s, f = hello_socket(daemon.socket)
    extra = 5
    for i in range(1, MAX_CALLS_PER_CONNECTION + extra + 1):
        call = {"jsonrpc": "2.0", "id": i, "method": "daemon.sleep", "params": {"seconds": 600}}
        f.write(json.dumps(call).encode() + b"\n")  # type: ignore[attr-defined]
    f.flush()  # type: ignore[attr-defined]
    s.settimeout(30)
    refused: list[dict] = []  # type: ignore[type-arg]
    while len(refused) < extra:
        reply = json.loads(f.readline())  # type: ignore[attr-defined]
        if "method" not in reply:  # not a progress notification
            refused.append(reply)
    assert all(r["error"]["code"] == ErrorCode.INVALID_REQUEST for r in refused)
    assert "too many calls in flight" in refused[0]["error"]["message"]
    with Client(daemon.socket) as other:  # another client is served all the same
        assert int(other.call("daemon.status")["inflight"]) == MAX_CALLS_PER_CONNECTION
    s.close()


def test_input_flood_cancels_the_call_instead_of_buffering(daemon: BangerEnv) -> None:
    pid = daemon.daemon_pid()
    assert pid is not None
    before = rss_mib(pid)
    s, f = hello_socket(daemon.socket)
    call = {"jsonrpc": "2.0", "id": 1, "method": "daemon.sleep", "params": {"seconds": 600}}
    f.write(json.dumps(call).encode() + b"\n")  # type: ignore[attr-defined]
    # daemon.sleep never reads its input: everything sent would otherwise pile up in the daemon.
    line = protocol.request(protocol.INPUT, {"id": 1, "data": "x" * MIB}, None)
    flood = 4 * MAX_INPUT_BYTES // MIB
    peak = before

    def send() -> None:
        for _ in range(flood):
            f.write(line)  # type: ignore[attr-defined]
        f.flush()  # type: ignore[attr-defined]

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive():
        peak = max(peak, rss_mib(pid))
        sender.join(0.05)
    s.settimeout(30)
    while "method" in (reply := json.loads(f.readline())):  # type: ignore[attr-defined]
        pass  # progress notifications of the sleep
    assert reply["id"] == 1 and reply["error"]["code"] == ErrorCode.CANCELLED
    # Generous: the bound is MAX_INPUT_BYTES of queued input; unbounded, this would hold 4 times that.
    assert peak - before < 2 * MAX_INPUT_BYTES / MIB, f"daemon RSS grew {peak - before:.0f} MiB"
    assert "bytes of input not consumed" in daemon.log_text()
    with Client(daemon.socket) as other:
        wait_for(lambda: int(other.call("daemon.status")["inflight"]) == 0, what="flooded call to end")
    s.close()


def test_client_refuses_an_endless_line(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    client = Client(tmp_path / "unused")
    client._sock = ours

    def flood() -> None:
        chunk = b"x" * MIB
        try:
            for _ in range(protocol.MAX_LINE // MIB + 4):
                theirs.sendall(chunk)
        except OSError:
            pass

    feeder = threading.Thread(target=flood)
    feeder.start()
    with pytest.raises(errors.DaemonError, match="longer than"):
        while True:
            client.fill()
    theirs.close()
    feeder.join(10)
