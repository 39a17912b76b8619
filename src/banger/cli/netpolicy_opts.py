"""`vm create` / `vm run` options for a VM's network policy (what its guest may reach)."""

from __future__ import annotations

from typing import Any

import click


def network_policy_options(fn: Any) -> Any:
    """Add --allow-host, --isolate, --egress, --allow-domain, --allow-cidr."""
    for opt in reversed(
        [
            click.option(
                "--allow-host", "allow_host", multiple=True, type=int, help="Let the guest reach this host TCP port."
            ),
            click.option("--isolate", is_flag=True, help="No traffic between this VM and other VMs."),
            click.option(
                "--egress",
                type=click.Choice(["allow", "deny", "allowlist"]),
                default=None,
                help="Outside traffic: allow (default), deny, or allowlist (--allow-domain/--allow-cidr).",
            ),
            click.option(
                "--allow-domain", "allow_domain", multiple=True, help="Allowlist a domain and its subdomains."
            ),
            click.option("--allow-cidr", "allow_cidr", multiple=True, help="Allowlist an IPv4 network."),
        ]
    ):
        fn = opt(fn)
    return fn


def network_policy_params(opts: dict[str, Any]) -> dict[str, Any] | None:
    """The `network_policy` RPC parameter from the parsed options (None when none was given)."""
    raw = {
        "allow_host": list(opts.get("allow_host") or ()),
        "isolate": bool(opts.get("isolate")),
        "egress": opts.get("egress"),
        "allow_domains": list(opts.get("allow_domain") or ()),
        "allow_cidrs": list(opts.get("allow_cidr") or ()),
    }
    given = {k: v for k, v in raw.items() if v}
    return given or None
