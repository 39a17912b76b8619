"""`banger snapshot ...`, `banger vm snapshot`, `banger vm clone` and `vm create --from-snapshot`."""

from __future__ import annotations

from typing import Any

import click

from banger.cli.common import json_option, rpc
from banger.cli.output import emit_json, kv, table
from banger.errors import InvalidInputError

SNAPSHOT_COLUMNS = [
    ("name", "NAME"),
    ("vm", "VM"),
    ("vmm", "VMM"),
    ("vmm_version", "VERSION"),
    ("size", "SIZE"),
    ("created_at", "CREATED"),
    ("users", "USED BY"),
]
# `vm create` options that describe the machine: a snapshot's machine is fixed, so these are refused with it.
MACHINE_OPTIONS = {
    "image": "--image",
    "kernel": "--kernel",
    "vcpus": "--vcpus",
    "memory": "--memory",
    "disk_size": "--disk-size",
    "vmm": "--vmm",
}


def _human(n: int) -> str:
    from banger.fsutil import human_size

    return human_size(n)


@click.group()
def snapshot() -> None:
    """List, show and remove snapshots (take one with `banger vm snapshot`)."""


@snapshot.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """All snapshots."""
    rows = rpc("snapshot.list")
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["size"] = _human(r["size_bytes"])
        r["users"] = ",".join(r.get("used_by") or []) or "-"
    table(rows, SNAPSHOT_COLUMNS, empty="no snapshots")


@snapshot.command()
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """One snapshot: where it came from, its machine, its size and the VMs made from it."""
    info = rpc("snapshot.show", {"name": name})
    if as_json:
        emit_json(info)
        return
    machine = info.get("machine") or {}
    kv(
        [
            ("name", info["name"]),
            ("vm", info["vm"]),
            ("vmm", f"{info['vmm']} {info['vmm_version']}"),
            ("created", info["created_at"]),
            ("size", _human(info["size_bytes"])),
            ("machine", f"{machine.get('vcpus')} vCPU, {machine.get('memory_mib')} MiB, net {machine.get('net')}"),
            ("kernel / image", f"{machine.get('kernel')} / {machine.get('image')}"),
            ("guest paused", f"{info.get('pause_seconds')} s"),
            ("used by", ", ".join(info.get("used_by") or []) or "-"),
        ]
    )


@snapshot.command()
@click.argument("name")
def rm(name: str) -> None:
    """Remove a snapshot (refused while a VM made from it exists)."""
    rpc("snapshot.rm", {"name": name})
    click.echo(f"removed {name}")


@click.command("snapshot")
@click.argument("name")
@click.option("--name", "snapshot_name", default=None, help="Snapshot name (default: NAME-snap).")
@click.option("--stop", is_flag=True, help="Shut the VM down after the snapshot instead of letting it run on.")
@json_option
def vm_snapshot(name: str, snapshot_name: str | None, stop: bool, as_json: bool) -> None:
    """Snapshot a running VM: memory, devices and disks, in one short pause."""
    info = rpc("vm.snapshot", {"name": name, "snapshot_name": snapshot_name, "stop": stop}, progress=not as_json)
    if as_json:
        emit_json(info)
    else:
        click.echo(
            f"snapshot {info['name']} of {name} ({_human(info['size_bytes'])}; guest paused {info['pause_seconds']} s)"
        )


@click.command("clone")
@click.argument("name")
@click.option("--name", "new_name", default=None, help="Clone name (with --count C: NAME-1 ... NAME-C).")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 64), help="How many clones.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait for each clone's agent.")
@json_option
def vm_clone(name: str, new_name: str | None, count: int, timeout: float | None, as_json: bool) -> None:
    """Fork a running VM: snapshot it and resume clones, each with its own name, MAC, IP and identity."""
    params = {"name": name, "new_name": new_name, "count": count, "timeout": timeout}
    clones = rpc("vm.clone", params, progress=not as_json)
    if as_json:
        emit_json(clones[0] if count == 1 else clones)
        return
    for info in clones:
        click.echo(f"cloned {name} -> {info['name']} ({info['state']}, ip {info.get('ip') or '-'})")


def create_from_snapshot(ctx: click.Context, snap: str, opts: dict[str, Any], *, start: bool, as_json: bool) -> None:
    """`vm create --from-snapshot SNAP`: options that would change the machine are refused."""
    given = [
        flag
        for key, flag in MACHINE_OPTIONS.items()
        if ctx.get_parameter_source(key) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        raise InvalidInputError(
            f"{', '.join(given)} cannot be combined with --from-snapshot: the snapshot fixes the machine",
            hint="a VM resumed from a snapshot has the snapshot's image, kernel, CPUs, memory, disk and VMM",
        )
    source = ctx.get_parameter_source("net")
    params = {
        "snapshot": snap,
        "name": opts["name"],
        "start": start,
        "net": opts["net"] if source is not click.core.ParameterSource.DEFAULT else None,
        "publish": list(opts["publish"]),
        "timeout": opts["timeout"],
    }
    info = rpc("snapshot.restore", params, progress=not as_json)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"created {info['name']} ({info['state']}) from snapshot {snap}")


snapshot.add_command(ls, name="list")  # as `vm list`; `ls` stays the documented one
