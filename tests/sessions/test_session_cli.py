"""The session CLI's refusals, against a real daemon and no VM (clear one-line errors, nothing half-made)."""

from __future__ import annotations

import pytest

from banger.cli.session_cmds import parse_signal
from banger.errors import InvalidInputError
from tests.conftest import BangerEnv


def test_signal_names() -> None:
    assert parse_signal("TERM") == parse_signal("sigterm") == parse_signal("15") == 15
    assert parse_signal("KILL") == 9
    with pytest.raises(InvalidInputError, match="unknown signal"):
        parse_signal("NOPE")


def test_refusals_without_a_vm(daemon: BangerEnv) -> None:
    assert daemon.cli("session", "ls", check=True).stdout.startswith("no sessions")
    assert daemon.cli("session", "ls", "--json", check=True).stdout.strip() == "[]"
    r = daemon.cli("session", "start", "ghost", "--", "true")
    assert r.returncode == 1 and "no VM named 'ghost'" in r.stderr
    r = daemon.cli("session", "start", "ghost")
    assert r.returncode == 1 and "no command given" in r.stderr
    r = daemon.cli("session", "send", "ghost", "s1")
    assert r.returncode == 1 and "nothing to send" in r.stderr
    r = daemon.cli("session", "logs", "ghost", "s1")
    assert r.returncode == 1 and "no VM named" in r.stderr
    r = daemon.cli("session", "start", "ghost", "--restart", "sometimes", "--", "true")
    assert r.returncode == 2 and "sometimes" in r.stderr
