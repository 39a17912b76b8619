"""Snapshot commands against a real daemon with no VMs: listings, and clear refusals before anything is made."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BangerEnv


def test_empty_listing_and_unknown_names(daemon: BangerEnv) -> None:
    assert json.loads(daemon.cli("snapshot", "ls", "--json", check=True).stdout) == []
    assert "no snapshots" in daemon.cli("snapshot", "ls", check=True).stdout
    for args in (("snapshot", "show", "nope"), ("snapshot", "rm", "nope")):
        r = daemon.cli(*args)
        assert r.returncode == 1 and "no snapshot named 'nope'" in r.stderr
    r = daemon.cli("vm", "create", "--from-snapshot", "nope", "--name", "x")
    assert r.returncode == 1 and "no snapshot named 'nope'" in r.stderr
    for args in (("vm", "snapshot", "ghost"), ("vm", "clone", "ghost")):
        r = daemon.cli(*args)
        assert r.returncode == 1 and "no VM named 'ghost'" in r.stderr
    assert json.loads(daemon.cli("vm", "ls", "--json", check=True).stdout) == []  # nothing half-made


@pytest.mark.parametrize(
    "option", [("--image", "img"), ("--kernel", "k"), ("--vcpus", "4"), ("--memory", "256"), ("--disk-size", "8G")]
)
def test_machine_options_are_refused_with_a_snapshot(banger_env: BangerEnv, option: tuple[str, str]) -> None:
    r = banger_env.cli("vm", "create", "--from-snapshot", "s", *option)
    assert r.returncode == 1
    assert f"{option[0]} cannot be combined with --from-snapshot" in r.stderr
    assert "Traceback" not in r.stderr


def test_clone_count_is_bounded(banger_env: BangerEnv) -> None:
    r = banger_env.cli("vm", "clone", "web", "--count", "0")
    assert r.returncode == 2 and "--count" in r.stderr
