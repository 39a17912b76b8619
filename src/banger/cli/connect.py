"""Reaching the daemon from the CLI, starting it when none answers (unless BANGER_NO_AUTOSTART=1)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from banger.cli.access import owns_daemon
from banger.config import Paths
from banger.daemon.lock import lock_holder
from banger.errors import DaemonError
from banger.rpc.client import Client, DaemonUnavailable

START_TIMEOUT = 60.0


def connect(paths: Paths, *, autostart: bool = True) -> Client:
    """A connected, handshaken client; starts bangerd first when allowed and needed."""
    client = Client(paths.socket)
    try:
        client.connect()
        return client
    except DaemonUnavailable:
        if not owns_daemon(str(paths.home)):  # a user never starts root's system daemon
            raise DaemonUnavailable(
                f"the system banger daemon is not running (socket {paths.socket})",
                hint="ask an administrator to start it (`banger daemon start` as root)",
            ) from None
        if not autostart or os.environ.get("BANGER_NO_AUTOSTART") == "1":
            raise DaemonUnavailable(
                f"the banger daemon is not running (socket {paths.socket})",
                hint="start it with `banger daemon start`",
            ) from None
    start_daemon(paths)
    # Another CLI may have won the start race; its daemon binds the socket right after taking the lock.
    deadline = time.monotonic() + 10
    while True:
        client = Client(paths.socket)
        try:
            client.connect()
            return client
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_daemon(paths: Paths, timeout: float = START_TIMEOUT) -> int:
    """Spawn bangerd detached and wait for its readiness message on a pipe; returns its pid."""
    paths.ensure()
    read_fd, write_fd = os.pipe()
    log = open(paths.daemon_log, "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "banger.daemon.main", "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(write_fd)
        log.close()
    try:
        deadline = time.monotonic() + timeout
        buf = b""
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                break
            chunk = os.read(read_fd, 64)
            if not chunk:
                break
            buf += chunk
            if b"ready" in buf:
                return proc.pid
    finally:
        os.close(read_fd)
    # The pipe closed without "ready": either another daemon won a start race, or this one failed.
    if lock_holder(paths.lock) is not None:
        return proc.pid
    raise DaemonError(f"bangerd failed to start: {_log_tail(paths)}", hint=f"see {paths.daemon_log}")


def _log_tail(paths: Paths, lines: int = 3) -> str:
    try:
        text = paths.daemon_log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "no log"
