"""`daemon stop` completes within 30 s whatever its clients do: here one that stopped reading its replies."""

from __future__ import annotations

import json
import socket
import threading
import time

from banger import __version__
from tests.conftest import BangerEnv
from tests.foundation.test_daemon import process_gone


def flood_without_reading(path: str, stop: threading.Event) -> socket.socket:
    """A client that says hello, then sends calls and never reads a reply (think of a suspended `vm logs -f`)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    hello = {"jsonrpc": "2.0", "id": 0, "method": "rpc.hello", "params": {"version": __version__, "protocol": 1}}
    s.sendall(json.dumps(hello).encode() + b"\n")

    def pump() -> None:
        n = 1
        s.settimeout(1)
        while not stop.is_set():
            batch = b"".join(
                json.dumps({"jsonrpc": "2.0", "id": n + i, "method": "daemon.status"}).encode() + b"\n"
                for i in range(200)
            )
            n += 200
            try:
                s.sendall(batch)
            except TimeoutError:
                continue  # the daemon stopped reading us: its replies to us are piling up
            except OSError:
                return

    threading.Thread(target=pump, daemon=True).start()
    return s


def test_daemon_stop_is_bounded_with_a_client_that_does_not_read(daemon: BangerEnv) -> None:
    pid = daemon.daemon_pid()
    assert pid
    stop = threading.Event()
    client = flood_without_reading(str(daemon.socket), stop)
    try:
        time.sleep(4)  # long enough for the replies to fill both socket buffers and the daemon's
        began = time.monotonic()
        r = daemon.cli("daemon", "stop", "--timeout", "60", timeout=90)
        took = time.monotonic() - began
        assert r.returncode == 0, r.stderr
        assert took < 30, f"daemon stop took {took:.1f}s"
        assert process_gone(pid)
    finally:
        stop.set()
        client.close()
