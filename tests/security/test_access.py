"""Who may use the daemon: a socket group's member can, anyone else is told how to get in; root-only operations;
host paths read with the caller's own rights; resource limits. Real users, a real daemon, the real CLI."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

from banger.errors import ErrorCode
from tests.conftest import BangerEnv
from tests.security.conftest import Users, wait_gone


def _hello(sock_path: Path) -> dict:  # type: ignore[type-arg]
    from banger import PROTOCOL_VERSION, __version__

    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    f = s.makefile("rwb")
    msg = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "rpc.hello",
        "params": {"version": __version__, "protocol": PROTOCOL_VERSION},
    }
    f.write(json.dumps(msg).encode() + b"\n")
    f.flush()
    reply = json.loads(f.readline())
    s.close()
    return reply  # type: ignore[no-any-return]


def test_state_root_opens_only_the_socket_to_the_group(users: Users, group_daemon: BangerEnv) -> None:
    home = group_daemon.home
    sock = os.stat(group_daemon.socket)
    assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == users.gid
    run = os.stat(home / "run")
    assert stat.S_IMODE(run.st_mode) == 0o710 and run.st_gid == users.gid
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o711
    # The member reaches the socket and nothing else: not the database, not the logs, not the listing.
    for path in (home / "banger.db", home / "logs" / "bangerd.log"):
        assert users.run_as(users.member, "cat", str(path)).returncode != 0
    assert users.run_as(users.member, "ls", str(home)).returncode != 0


def test_member_uses_the_system_daemon_outsider_is_refused(users: Users, group_daemon: BangerEnv) -> None:
    home = group_daemon.home
    ok = users.cli(users.member, home, "vm", "ls", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == []
    status = users.cli(users.member, home, "daemon", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["home"] == str(home)
    for args in (("vm", "ls"), ("daemon", "status")):
        no = users.cli(users.outsider, home, *args)
        assert no.returncode == 1, (args, no)
        assert "permission denied" in no.stderr
        assert f"usermod -aG {users.group} {users.outsider.name}" in no.stderr


def test_peer_credentials_are_checked_even_if_the_socket_is_opened_up(users: Users, group_daemon: BangerEnv) -> None:
    # Defence in depth: with the file mode widened by mistake, the handshake still refuses a non-member.
    os.chmod(group_daemon.home / "run", 0o711)
    os.chmod(group_daemon.socket, 0o666)
    probe = (
        "import json,socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
        "s.sendall(json.dumps({'jsonrpc':'2.0','id':1,'method':'rpc.hello','params':json.loads(sys.argv[2])}).encode()+b'\\n');"
        "print(s.makefile().readline())"
    )
    from banger import PROTOCOL_VERSION, __version__

    params = json.dumps({"version": __version__, "protocol": PROTOCOL_VERSION})
    out = users.run_as(users.outsider, str(users.python), "-c", probe, str(group_daemon.socket), params)
    reply = json.loads(out.stdout)
    assert reply["error"]["code"] == ErrorCode.PERMISSION_DENIED, reply
    assert "usermod -aG" in reply["error"]["data"]["hint"]
    assert "result" in _hello(group_daemon.socket)  # root still gets in


def test_host_global_operations_are_root_only(users: Users, group_daemon: BangerEnv) -> None:
    home = group_daemon.home
    pid = group_daemon.daemon_pid()
    for args in (("daemon", "stop"), ("network", "teardown"), ("network", "setup-host")):
        res = users.cli(users.member, home, *args)
        assert res.returncode == 1 and "root only" in res.stderr, (args, res)
    assert group_daemon.daemon_pid() == pid
    # With the system daemon down, a member neither starts it nor gets a daemon of their own.
    group_daemon.cli("daemon", "stop", check=True)
    assert pid is not None and wait_gone(pid)
    for args in (("vm", "ls"), ("daemon", "start")):
        res = users.cli(users.member, home, *args)
        assert res.returncode == 1, (args, res)
    assert "not running" in users.cli(users.member, home, "vm", "ls").stderr
    assert group_daemon.daemon_pid() is None


def _denied(reply: dict) -> bool:  # type: ignore[type-arg]
    return reply.get("error", {}).get("code") == ErrorCode.PERMISSION_DENIED


def test_import_reads_host_paths_with_the_callers_rights(users: Users, group_daemon: BangerEnv) -> None:
    home = group_daemon.home
    secret = users.workdir(users.outsider)  # 0700, someone else's
    (secret / "rootfs").mkdir()
    (secret / "rootfs" / "hello").write_text("hi")
    os.chown(secret / "rootfs", users.outsider.uid, users.outsider.gid)
    # The CLI refuses what its user cannot see; the daemon refuses it too, for a client that skips the CLI.
    res = users.cli(users.member, home, "image", "import", "stolen", str(secret / "rootfs"))
    assert res.returncode != 0 and "stolen" not in group_daemon.cli("image", "ls").stdout
    reply = users.rpc(users.member, home, "image.import", {"name": "stolen", "source": str(secret / "rootfs")})
    assert _denied(reply), reply
    # A readable directory with one unreadable file in it is refused as a whole, as `tar` would refuse it.
    tree = users.workdir(users.member) / "tree"
    tree.mkdir()
    (tree / "ok").write_text("fine")
    os.symlink("/etc/shadow", tree / "shadow-link")  # a link is copied as a link: harmless
    hidden = tree / "hidden"
    hidden.write_text("no")
    os.chmod(hidden, 0o600)  # root's
    os.chown(tree, users.member.uid, users.member.gid)
    res = users.cli(users.member, home, "image", "import", "mine", str(tree))
    assert res.returncode == 1 and "permission denied" in res.stderr, res
    for method, params in (
        ("kernel.import", {"path": "/etc/shadow", "name": "k"}),
        ("kernel.catalog", {"catalog": "/etc/shadow"}),
        ("kernel.bundle", {"name": "none", "output": "/etc/banger-bundle.tar.zst"}),
    ):
        reply = users.rpc(users.member, home, method, params)
        assert _denied(reply) or "does not exist" in str(reply), (method, reply)
    assert not Path("/etc/banger-bundle.tar.zst").exists()
    assert list((home / "cache" / "staging").iterdir()) == []  # nothing left half-staged


def test_resource_requests_have_upper_bounds(users: Users, group_daemon: BangerEnv) -> None:
    home = group_daemon.home
    res = users.cli(users.member, home, "vm", "create", "--vcpus", "8", "--no-start")
    assert res.returncode == 1 and "max_vcpus" in res.stderr, res
    res = group_daemon.cli("vm", "create", "--memory", "4096", "--no-start")
    assert res.returncode == 1 and "max_memory_mib" in res.stderr, res
