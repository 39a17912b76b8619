"""`banger vm proxy`, `banger vm ssh` and `banger ssh-config`: OpenSSH (and anything nc-like) through the agent."""

from __future__ import annotations

import base64
import contextlib
import os
import select
import sys
from typing import Any

import click

from banger.cli import ssh_files
from banger.cli.common import rpc
from banger.cli.connect import connect
from banger.config import Paths
from banger.rpc import protocol

# Bytes of stdin sent to the daemon and not yet acknowledged as written into the tunnel: bounds the daemon's buffer.
INPUT_WINDOW = 1 << 20


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _refresh_ssh(name: str) -> dict[str, Any]:
    """Authorize the caller's keys in VM `name` and copy its pinned host keys into banger's known_hosts."""
    ssh_files.ensure_client_key()
    info: dict[str, Any] = rpc("vm.ssh", {"name": name, "keys": ssh_files.public_keys()})
    ssh_files.update_known_hosts([info])
    return info


def run_proxy(name: str, port: int) -> int:
    """Join stdin/stdout to guest port `port`; 0 when the guest side closes (stdin EOF is passed on as such)."""
    client = connect(Paths.from_env())
    rid = client.send_request("vm.tunnel", {"name": name, "port": port})
    sock = client.sock
    stdin_open, unacked = True, 0

    def send_input(**fields: Any) -> None:
        sock.sendall(protocol.request(protocol.INPUT, {"id": rid, **fields}, None))

    try:
        while True:
            msg = client.pop_message()
            if msg is None:
                fds = [sock.fileno()] + ([0] if stdin_open and unacked < INPUT_WINDOW else [])
                ready, _, _ = select.select(fds, [], [])
                if 0 in ready:
                    data = os.read(0, 65536)
                    if data:
                        send_input(data=base64.b64encode(data).decode())
                        unacked += len(data)
                    else:
                        send_input(eof=True)
                        stdin_open = False
                if sock.fileno() in ready:
                    client.fill()
                continue
            if "method" in msg:
                params = msg.get("params") or {}
                if params.get("id") != rid:
                    continue
                if "data" in params:
                    try:
                        _write_all(1, base64.b64decode(params["data"]))
                    except BrokenPipeError:
                        return 0  # whoever read our stdout is gone: that side closed
                elif "ack" in params:
                    unacked -= int(params["ack"])
                continue
            if msg.get("id") == rid:
                client.result_of(msg)
                return 0
    except KeyboardInterrupt:
        client.cancel(rid, grace=5.0)
        raise
    finally:
        client.close()


@click.command("proxy")
@click.argument("name")
@click.argument("port", type=click.IntRange(1, 65535))
def proxy(name: str, port: int) -> None:
    """Join stdin/stdout to guest 127.0.0.1:PORT (for ssh's ProxyCommand; NAME may be NAME.<dns_domain>)."""
    if port == 22:
        _refresh_ssh(name)  # ssh reads known_hosts only after we connect: the pins are there in time
    sys.exit(run_proxy(name, port))


@click.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--ssh-key", "ssh_keys", multiple=True, type=click.Path(), help="Also authorize this public key.")
def vm_ssh(name: str, command: tuple[str, ...], ssh_keys: tuple[str, ...]) -> None:
    """Run the system `ssh` into a VM (banger's key, pinned host keys, no host networking needed)."""
    ssh_files.ensure_client_key()
    info = rpc("vm.ssh", {"name": name, "keys": ssh_files.public_keys(ssh_keys)})
    ssh_files.update_known_hosts([info])
    hosts = rpc("vm.ssh_hosts")
    from banger import proc

    ssh = proc.which("ssh", hint="install the openssh-client package")
    argv = [ssh]
    for key, value in ssh_files.ssh_options(str(hosts["user"])):
        argv += ["-o", f"{key}={value}"]
    argv.append(str(info["hosts"][0]))
    if command:
        argv += ["--", *command]
    sys.stdout.flush()
    with contextlib.suppress(AttributeError):
        sys.stderr.flush()
    os.execv(ssh, argv)  # ssh's exit code is ours


@click.command("ssh-config")
def ssh_config() -> None:
    """Print an OpenSSH config block for `Host *.<dns_domain>` (use with `ssh -F` or Include it)."""
    ssh_files.ensure_client_key()
    info = rpc("vm.ssh_hosts")
    ssh_files.update_known_hosts(list(info["hosts"]), replace_all=True)
    lines = [f"Host *.{info['domain']}"]
    lines += [f"    {key} {value}" for key, value in ssh_files.ssh_options(str(info["user"]))]
    click.echo("\n".join(lines))


def register(group: click.Group) -> None:
    """Add `vm proxy` and `vm ssh` to the vm group."""
    group.add_command(proxy)
    group.add_command(vm_ssh)
