"""A daemon that runs other code than the CLI (after a `git pull` or an upgrade): replace it, or say how.

The CLI replaces the daemon itself when that is safe: the daemon belongs to the caller and serves no call. Else
it stops with the exact command to run. Running VMs are not touched either way (they outlive the daemon).
"""

from __future__ import annotations

import os
import pwd
import select
import sys

from banger.buildinfo import code_id
from banger.config import Paths
from banger.errors import DaemonError, VersionMismatchError
from banger.rpc.client import Client

STOP_TIMEOUT = 30.0


def owner_of(pid: int) -> int | None:
    """The uid a process runs as, or None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait for a process to exit (pidfd, no polling); True if it did within `timeout`."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def _user(uid: int | None) -> str:
    if uid is None:
        return "nobody"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def refuse_stale(client: Client) -> None:
    """The daemon runs other code and this CLI may not start one: stop here with what to run."""
    pid = client.daemon_info.get("pid", "?")
    client.close()
    raise VersionMismatchError(
        f"the daemon (pid {pid}) runs other code than this CLI ({code_id()})",
        hint="restart it: `banger daemon stop && banger daemon start`",
    )


def stop_stale(paths: Paths, client: Client) -> None:
    """Stop the daemon `client` is connected to, which runs other code; refuse (saying what to do) if unsafe.

    Closes `client`. Raises VersionMismatchError when the daemon is someone else's or busy.
    """
    try:
        status = client.call("daemon.status")
        pid, inflight = int(status["pid"]), int(status.get("inflight", 0))
        theirs = status.get("build") or client.daemon_info.get("build") or "an older build"
        what = f"the daemon (pid {pid}, {theirs}) runs other code than this CLI ({code_id()})"
        owner = owner_of(pid)
        if owner != os.geteuid():
            raise VersionMismatchError(
                f"{what} and belongs to {_user(owner)}",
                hint=f"ask {_user(owner)} to run `banger daemon stop` (BANGER_HOME={paths.home}), then retry",
            )
        if inflight > 0:
            raise VersionMismatchError(
                f"{what} and is serving {inflight} call(s)",
                hint="when they are done, run `banger daemon stop` and retry (the next command starts the new one)",
            )
        client.call("daemon.stop")
    finally:
        client.close()
    if not wait_pid_exit(pid, STOP_TIMEOUT):
        raise DaemonError(f"the old daemon (pid {pid}) did not exit within {STOP_TIMEOUT}s")
    sys.stderr.write(f"banger: restarted the daemon, which ran other code ({theirs})\n")
