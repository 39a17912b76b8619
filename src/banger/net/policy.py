"""Each VM's network policy (what its guest may reach), and the one service over the `vm_network_policy` table."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network
from typing import Any

from banger.errors import InvalidInputError
from banger.store.db import Store

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class Egress(StrEnum):
    """Where a guest's traffic to the outside world may go."""

    ALLOW = "allow"  # anywhere (NAT)
    DENY = "deny"  # nowhere beyond the host's bridge (banger's DNS still answers .vm names)
    ALLOWLIST = "allowlist"  # only allowed domains (and their subdomains) and CIDRs


@dataclass(frozen=True)
class NetPolicy:
    """--allow-host, --isolate, --egress, --allow-domain, --allow-cidr of one VM."""

    allow_host: tuple[int, ...] = ()
    isolate: bool = False
    egress: Egress = Egress.ALLOW
    allow_domains: tuple[str, ...] = ()
    allow_cidrs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The form `vm show --json` reports under `network_policy`."""
        return {
            "allow_host": list(self.allow_host),
            "isolate": self.isolate,
            "egress": self.egress.value,
            "allow_domains": list(self.allow_domains),
            "allow_cidrs": list(self.allow_cidrs),
        }

    def allows_name(self, qname: str) -> bool:
        """Whether a DNS name may resolve for this guest (a listed domain covers its subdomains)."""
        if self.egress is Egress.ALLOW:
            return True
        name = qname.lower().rstrip(".")
        return self.egress is Egress.ALLOWLIST and any(name == d or name.endswith("." + d) for d in self.allow_domains)

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> NetPolicy:
        """Check what a client sent (the CLI's flags): a clear error for anything unusable."""
        if not raw:
            return cls()
        unknown = set(raw) - {"allow_host", "isolate", "egress", "allow_domains", "allow_cidrs"}
        if unknown:
            raise InvalidInputError(f"unknown network policy keys: {', '.join(sorted(unknown))}")
        ports = tuple(sorted({_port(p) for p in raw.get("allow_host") or []}))
        domains = tuple(sorted({_domain(d) for d in raw.get("allow_domains") or []}))
        cidrs = tuple(sorted({_cidr(c) for c in raw.get("allow_cidrs") or []}))
        egress_raw = raw.get("egress")
        if egress_raw is None:
            egress = Egress.ALLOWLIST if domains or cidrs else Egress.ALLOW
        else:
            try:
                egress = Egress(egress_raw)
            except ValueError:
                raise InvalidInputError(f"--egress must be allow, deny or allowlist, not {egress_raw!r}") from None
        if (domains or cidrs) and egress is not Egress.ALLOWLIST:
            raise InvalidInputError("--allow-domain and --allow-cidr go with --egress allowlist")
        return cls(ports, bool(raw.get("isolate", False)), egress, domains, cidrs)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetPolicy:
        """Read back what to_json stored."""
        return cls(
            tuple(data.get("allow_host", ())),
            bool(data.get("isolate", False)),
            Egress(data.get("egress", "allow")),
            tuple(data.get("allow_domains", ())),
            tuple(data.get("allow_cidrs", ())),
        )


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInputError(f"--allow-host {value!r}: a TCP port number 1-65535")
    return value


def _domain(value: Any) -> str:
    name = str(value).lower().strip().rstrip(".")
    if len(name) > 253 or "." not in name or not all(_LABEL.match(label) for label in name.split(".")):
        raise InvalidInputError(f"--allow-domain {value!r}: not a domain name like example.org")
    return name


def _cidr(value: Any) -> str:
    try:
        return str(IPv4Network(str(value), strict=False))
    except ValueError as exc:
        raise InvalidInputError(f"--allow-cidr {value!r}: {exc}") from None


class NetPolicyService:
    """VM id -> NetPolicy; a VM without a row has the default (allow everything, not isolated)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def assign(self, vm_id: str, policy: NetPolicy) -> None:
        """Record a VM's policy."""
        self.store.execute(
            "INSERT INTO vm_network_policy (vm_id, policy) VALUES (?, ?) "
            "ON CONFLICT(vm_id) DO UPDATE SET policy = excluded.policy",
            (vm_id, json.dumps(policy.to_json())),
        )

    def get(self, vm_id: str) -> NetPolicy:
        """A VM's policy (the default when none was recorded)."""
        row = self.store.one("SELECT policy FROM vm_network_policy WHERE vm_id = ?", (vm_id,))
        return NetPolicy.from_json(json.loads(row["policy"])) if row else NetPolicy()
