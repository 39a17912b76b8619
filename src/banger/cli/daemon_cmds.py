"""`banger version` and `banger daemon start|stop|status|logs`."""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Any

import click

from banger.cli import fast
from banger.cli.access import owns_daemon
from banger.cli.common import json_option, rpc
from banger.cli.connect import start_daemon
from banger.cli.output import emit_json
from banger.config import Paths
from banger.daemon.lock import lock_holder
from banger.errors import DaemonError, PermissionDeniedError
from banger.rpc.client import Client, DaemonUnavailable


def _daemon_status(paths: Paths) -> dict[str, Any] | None:
    client = Client(paths.socket)
    try:
        client.connect(across_versions=True)
    except DaemonUnavailable:
        return None
    try:
        status: dict[str, Any] = client.call("daemon.status")
        return status
    finally:
        client.close()


@click.command()
@json_option
def version(as_json: bool) -> None:
    """Print the CLI's and the daemon's version, git commit and build date."""
    sys.exit(fast.version_cmd(as_json))


@click.group()
def daemon() -> None:
    """Manage the banger daemon (bangerd)."""


@daemon.command()
@json_option
def start(as_json: bool) -> None:
    """Start bangerd in the background; returns once it answers."""
    paths = Paths.from_env()
    status = _daemon_status(paths)
    if status is None and not owns_daemon(str(paths.home)):
        raise PermissionDeniedError(
            f"permission denied: only root starts the system daemon ({paths.home})", hint="run it as root"
        )
    if status is None:
        start_daemon(paths, explicit=True)
        status = rpc("daemon.status", autostart=False, across_versions=True)
        message = f"bangerd started (pid {status['pid']})"
    else:
        message = f"bangerd already running (pid {status['pid']})"
    if as_json:
        emit_json(status)
    else:
        click.echo(message)


@daemon.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for it to exit.")
def stop(timeout: float) -> None:
    """Stop bangerd gracefully (in-flight work is cancelled and cleaned up)."""
    paths = Paths.from_env()
    try:
        reply = rpc("daemon.stop", autostart=False, across_versions=True)
    except DaemonUnavailable:
        click.echo("bangerd is not running")
        return
    pid = int(reply["pid"])
    if not _wait_pid_exit(pid, timeout):
        raise DaemonError(f"bangerd (pid {pid}) did not exit within {timeout}s")
    if lock_holder(paths.lock) not in (None, pid):
        raise DaemonError("another bangerd took over the state root while stopping")
    click.echo(f"bangerd stopped (pid {pid})")


def _wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait for a process to exit using a pidfd (no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


@daemon.command()
@json_option
def status(as_json: bool) -> None:
    """Show whether bangerd runs, and its pid, version and state root."""
    sys.exit(fast.status_cmd(as_json))


@daemon.command(hidden=True)
@click.argument("seconds", type=float)
def sleep(seconds: float) -> None:
    """Diagnostic: a cancellable daemon-side sleep with progress (Ctrl-C cancels it in the daemon)."""
    result = rpc("daemon.sleep", {"seconds": seconds}, progress=True)
    click.echo(f"slept {result['slept']}s")


@daemon.command()
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines from the end.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
def logs(lines: int, follow: bool) -> None:
    """Print the daemon's log file."""
    path = Paths.from_env().daemon_log
    if not path.exists():
        raise DaemonError(f"no daemon log at {path} yet")
    with path.open("rb") as f:
        tail = f.read().splitlines()[-lines:] if lines > 0 else []
        for line in tail:
            click.echo(line.decode(errors="replace"))
        while follow:
            chunk = f.readline()
            if chunk:
                click.echo(chunk.decode(errors="replace").rstrip("\n"))
            else:
                time.sleep(0.3)
