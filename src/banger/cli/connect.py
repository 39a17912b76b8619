"""Reaching the daemon from the CLI, starting it when none answers (unless BANGER_NO_AUTOSTART=1)."""

from __future__ import annotations

import os
import pwd
import select
import subprocess
import sys
import time

from banger.cli.access import owns_daemon
from banger.config import ENV_OVERRIDES, Paths
from banger.daemon.lock import lock_holder
from banger.errors import DaemonError
from banger.rpc.client import Client, DaemonUnavailable

START_TIMEOUT = 60.0


def connect(paths: Paths, *, autostart: bool = True, across_versions: bool = False) -> Client:
    """A connected, handshaken client; starts bangerd first when allowed and needed.

    A daemon that runs other code than this CLI is replaced (see cli/upgrade.py), unless `across_versions`
    (for `daemon status` and `daemon stop`, which work on any daemon).
    """
    client = Client(paths.socket)
    try:
        client.connect(across_versions=True)
        if client.same_code or across_versions:
            return client
        from banger.cli.upgrade import refuse_stale, stop_stale

        if not autostart or os.environ.get("BANGER_NO_AUTOSTART") == "1":
            refuse_stale(client)  # it could not be started again: say so rather than stop it
        stop_stale(paths, client)
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


def daemon_env(paths: Paths, *, explicit: bool) -> dict[str, str]:
    """The environment a daemon starts with: fixed, never the whole environment of whichever CLI started it.

    The daemon's settings come from the config file; BANGER_HOME is passed (absolute). Only a daemon started on
    purpose (`banger daemon start`, explicit) also takes the BANGER_* setting overrides of that shell. PATH is
    the system's plus this interpreter's bin directory (where setup.sh puts firecracker); PYTHONPATH is kept
    because it decides which code the daemon runs, and that must be the CLI's.
    """
    bindir = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "BANGER_HOME": str(paths.home.absolute()),
        "LC_ALL": "C.UTF-8",
        "HOME": pwd.getpwuid(os.geteuid()).pw_dir,
    }
    keep = ["PYTHONPATH", *ENV_OVERRIDES] if explicit else ["PYTHONPATH"]
    env.update({k: os.environ[k] for k in keep if os.environ.get(k)})
    return env


def start_daemon(paths: Paths, timeout: float = START_TIMEOUT, *, explicit: bool = False) -> int:
    """Spawn bangerd detached (clean environment, cwd /) and wait for its readiness message; returns its pid."""
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
            env=daemon_env(paths, explicit=explicit),
            cwd="/",
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
