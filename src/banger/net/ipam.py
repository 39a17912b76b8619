"""Pure IPv4 address allocation inside banger's guest subnet; the store persists the leases."""

from __future__ import annotations

from collections.abc import Iterator, Set
from ipaddress import IPv4Address, IPv4Network

from banger.errors import BangerError, ErrorCode, InvalidInputError


class SubnetFullError(BangerError):
    """Every guest address in the subnet is leased."""

    code = ErrorCode.BUSY


def gateway(subnet: IPv4Network) -> IPv4Address:
    """The subnet's first host address, which the bridge holds."""
    return subnet.network_address + 1


def guest_addresses(subnet: IPv4Network) -> Iterator[IPv4Address]:
    """Addresses guests may use, in order: every host address except the gateway."""
    if subnet.prefixlen > 30:
        raise InvalidInputError(f"subnet {subnet} is too small for guests (need /30 or larger)")
    gw = gateway(subnet)
    return (a for a in subnet.hosts() if a != gw)


def allocate(subnet: IPv4Network, taken: Set[IPv4Address]) -> IPv4Address:
    """The lowest free guest address in `subnet`, or SubnetFullError when none is left."""
    for address in guest_addresses(subnet):
        if address not in taken:
            return address
    raise SubnetFullError(
        f"no free guest address left in {subnet} ({subnet.num_addresses - 3} in use)",
        hint="remove unused VMs or configure a larger subnet",
    )


def check_lease(subnet: IPv4Network, address: IPv4Address) -> None:
    """Raise InvalidInputError unless `address` is a usable guest address of `subnet`."""
    if address not in subnet or address in (subnet.network_address, subnet.broadcast_address, gateway(subnet)):
        raise InvalidInputError(f"{address} is not a usable guest address in {subnet}")
