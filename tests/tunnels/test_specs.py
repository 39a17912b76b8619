"""Parsing of --publish / --reverse, authorized_keys merging, and the CLI's SSH files (no VM needed)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from banger.cli import ssh_files
from banger.errors import InUseError, InvalidInputError
from banger.guest.sshsetup import MARK, merge_authorized
from banger.tunnels.publish import Publish, check_bindable, parse_publish
from banger.tunnels.settings import Reverse, check_public_key, parse_reverse

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOZ3nUqIKPmbHB5Pt5mH1uRrZ3pXnFpy2bqvPVGXyO8v"


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("8080:80", Publish("127.0.0.1", 8080, 80)),
        ("8080", Publish("127.0.0.1", 8080, 8080)),
        ("0.0.0.0:8080:80", Publish("0.0.0.0", 8080, 80)),
        ("192.0.2.7:1:65535", Publish("192.0.2.7", 1, 65535)),
    ],
)
def test_parse_publish(spec: str, want: Publish) -> None:
    assert parse_publish(spec) == want


@pytest.mark.parametrize("spec", ["", "a:80", "8080:0", "8080:65536", "host:1:2", "1:2:3:4", "::1:80:80"])
def test_parse_publish_refuses(spec: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_publish(spec)


def test_parse_reverse() -> None:
    assert parse_reverse("11434:8000") == Reverse(11434, 8000)
    assert parse_reverse("11434") == Reverse(11434, 11434)
    for bad in ("x:1", "0:1", "1:2:3"):
        with pytest.raises(InvalidInputError):
            parse_reverse(bad)


def test_check_bindable_names_the_taken_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(InUseError, match=f"host port 127.0.0.1:{port} is already in use"):
            check_bindable(Publish("127.0.0.1", port, 80))
    with pytest.raises(InvalidInputError, match="not an address of this host"):
        check_bindable(Publish("192.0.2.1", port, 80))


def test_public_keys_are_checked_and_merged_once() -> None:
    assert check_public_key(f"  {KEY}   me@host ") == f"{KEY} me@host"
    with pytest.raises(InvalidInputError):
        check_public_key("-----BEGIN OPENSSH PRIVATE KEY-----")
    existing = "# mine\nssh-rsa AAAAB3 user@laptop\n"
    merged = merge_authorized(existing, [KEY, f"{KEY} other-comment", "ssh-rsa AAAAB3"])
    assert merged == f"# mine\nssh-rsa AAAAB3 user@laptop\n{KEY} {MARK}\n"


def test_cli_ssh_files_live_in_the_users_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_rsa.pub").write_text("ssh-rsa AAAAB3user user@host\n")
    (tmp_path / ".ssh" / "junk.pub").write_text("not a key at all\nsecond line\n")
    key = ssh_files.ensure_client_key()
    assert key == tmp_path / "cfg" / "banger" / "ssh" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600 and (key.parent.stat().st_mode & 0o777) == 0o700
    keys = ssh_files.public_keys()
    assert keys[0].startswith("ssh-ed25519 ") and "ssh-rsa AAAAB3user" in keys
    assert len(keys) == 2  # the junk file is skipped, the banger key comes once
    with pytest.raises(InvalidInputError, match="private key"):
        ssh_files.public_keys((str(key),))
    hosts = ssh_files.update_known_hosts([{"hosts": ["a.vm", "a"], "host_keys": [KEY]}])
    ssh_files.update_known_hosts([{"hosts": ["b.vm", "b"], "host_keys": [KEY]}])
    ssh_files.update_known_hosts([{"hosts": ["a.vm", "a"], "host_keys": []}])  # a's keys replaced (gone)
    assert hosts.read_text() == f"b.vm,b {KEY}\n"
    assert hosts.stat().st_mode & 0o777 == 0o600


def test_guest_without_sshd_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.guest import sshsetup

    monkeypatch.setattr(sshsetup, "SSHD_CANDIDATES", ("/nonexistent/sshd",))
    assert sshsetup.setup("root", [KEY]) == {"sshd": False, "host_keys": []}
