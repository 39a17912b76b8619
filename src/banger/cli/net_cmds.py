"""`banger network ...`: the guests' bridge, addresses, NAT table and DNS."""

from __future__ import annotations

from typing import Any

import click

from banger.cli.common import json_option, rpc
from banger.cli.output import emit_json, kv, table


@click.group()
def network() -> None:
    """Guest networking: bridge, address leases, published ports, DNS."""


def _yes_no(value: Any) -> str:
    return "yes" if value else "no"


@network.command()
@json_option
def status(as_json: bool) -> None:
    """Show the bridge, leases, published ports, nft table and DNS server."""
    info = rpc("network.status")
    if as_json:
        emit_json(info)
        return
    bridge, dns = info["bridge"], info["dns"]
    state = "up" if bridge.get("up") else ("down" if bridge.get("present") else "missing")
    kv(
        [
            ("available", "yes" if info["available"] else f"no ({info['reason']})"),
            ("bridge", f"{bridge['name']} {bridge['address']} ({state})"),
            ("subnet", info["subnet"]),
            ("ip_forward", info["ip_forward"]),
            (
                "dns",
                f"{dns['listening']} for *.{dns['domain']}" if dns["listening"] else f"not running ({dns['error']})",
            ),
            ("dns upstreams", ", ".join(dns["upstreams"]) or None),
            ("dns records", dns["records"]),
        ]
    )
    for problem in info.get("problems", []):
        click.echo(f"problem: {problem}")
    click.echo()
    leases = [{**lease, "tap_present": _yes_no(lease["tap_present"])} for lease in info["leases"]]
    table(
        leases,
        [("vm", "VM"), ("ip", "ADDRESS"), ("tap", "TAP"), ("tap_present", "TAP PRESENT")],
        empty="no VM holds an address",
    )
    if info["forwards"]:
        click.echo()
        forwards = [{**f, "active": _yes_no(f["active"])} for f in info["forwards"]]
        table(
            forwards,
            [
                ("vm", "VM"),
                ("proto", "PROTO"),
                ("host_port", "HOST PORT"),
                ("guest_port", "GUEST PORT"),
                ("active", "ACTIVE"),
            ],
        )
    click.echo()
    click.echo(info["nft_table"].rstrip() if info["nft_table"] else "no banger nftables table")


@network.command("setup-host")
@json_option
def setup_host(as_json: bool) -> None:
    """Make this host resolve <vm>.<domain> through banger's DNS (systemd-resolved), or explain how."""
    info = rpc("network.setup_host")
    if as_json:
        emit_json(info)
        return
    for command in info["commands"]:
        click.echo(f"ran: {command}")
    click.echo(info["message"])


@network.command()
@click.option("--force", is_flag=True, help="Even while running VMs use the network (they lose it).")
@json_option
def teardown(force: bool, as_json: bool) -> None:
    """Undo what banger changed on the host: bridge, TAPs, nft table, ip_forward (set up again on next use)."""
    result = rpc("network.teardown", {"force": force})
    if as_json:
        emit_json(result)
    else:
        taps = result.get("removed_taps") or []
        click.echo(
            f"removed bridge {result['bridge']}, banger's nft table" + (f" and TAPs {', '.join(taps)}" if taps else "")
        )
