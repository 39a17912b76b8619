"""Pure address allocation."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from banger.errors import BangerError, InvalidInputError
from banger.net.ipam import SubnetFullError, allocate, check_lease, gateway, guest_addresses

SUBNET = IPv4Network("172.30.77.0/24")


def test_first_allocation_skips_gateway() -> None:
    assert gateway(SUBNET) == IPv4Address("172.30.77.1")
    assert allocate(SUBNET, set()) == IPv4Address("172.30.77.2")


def test_fills_holes_first() -> None:
    taken = {IPv4Address("172.30.77.2"), IPv4Address("172.30.77.4")}
    assert allocate(SUBNET, taken) == IPv4Address("172.30.77.3")


def test_full_subnet_raises_clear_error() -> None:
    small = IPv4Network("10.0.0.0/29")  # hosts .1-.6; .1 is the gateway -> 5 guests
    taken: set[IPv4Address] = set()
    for _ in range(5):
        taken.add(allocate(small, taken))
    assert taken == {IPv4Address(f"10.0.0.{i}") for i in range(2, 7)}
    with pytest.raises(SubnetFullError, match="no free guest address left in 10.0.0.0/29") as info:
        allocate(small, taken)
    assert isinstance(info.value, BangerError)


def test_tiny_subnets() -> None:
    assert list(guest_addresses(IPv4Network("10.0.0.0/30"))) == [IPv4Address("10.0.0.2")]
    with pytest.raises(InvalidInputError):
        allocate(IPv4Network("10.0.0.0/31"), set())


def test_check_lease() -> None:
    check_lease(SUBNET, IPv4Address("172.30.77.9"))
    for bad in ("172.30.77.0", "172.30.77.1", "172.30.77.255", "10.0.0.2"):
        with pytest.raises(InvalidInputError):
            check_lease(SUBNET, IPv4Address(bad))


@given(st.sets(st.integers(min_value=0, max_value=255)))
def test_allocation_is_valid_and_free(taken_octets: set[int]) -> None:
    taken = {IPv4Address(f"172.30.77.{i}") for i in taken_octets}
    try:
        got = allocate(SUBNET, taken)
    except SubnetFullError:
        assert all(IPv4Address(f"172.30.77.{i}") in taken for i in range(2, 255))
        return
    assert got not in taken
    assert got not in (SUBNET.network_address, SUBNET.broadcast_address, gateway(SUBNET))
    assert got in SUBNET
    check_lease(SUBNET, got)
