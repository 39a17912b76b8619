"""VMs have owners, and `vm cp` touches host files with the caller's rights: a member, root, real guests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BangerEnv
from tests.images.conftest import debian_image, debian_rootfs_tar  # noqa: F401
from tests.kernels.conftest import debian_kernel  # noqa: F401
from tests.security.conftest import Users

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def member_vm(users: Users, vm_home: BangerEnv) -> Iterator[str]:
    """A running VM the member created (so it is theirs)."""
    res = users.cli(users.member, vm_home.home, "vm", "create", "--name", "mine", "--net", "none", "--vcpus", "1")
    assert res.returncode == 0, res.stderr
    yield "mine"
    vm_home.cli("vm", "rm", "-f", "mine", timeout=120)


def test_owners_listing_and_limits(users: Users, vm_home: BangerEnv, member_vm: str) -> None:
    home = vm_home.home
    vm_home.cli("vm", "create", "--name", "roots", "--no-start", check=True)
    try:
        mine = json.loads(users.cli(users.member, home, "vm", "ls", "--json").stdout)
        assert [v["name"] for v in mine] == [member_vm] and mine[0]["owner"] == users.member.name
        listing = vm_home.cli("vm", "ls", check=True).stdout
        assert "OWNER" in listing.splitlines()[0]
        assert users.member.name in listing and "root" in listing
        for args in (("vm", "show", "roots"), ("vm", "rm", "roots"), ("vm", "stop", "roots")):
            res = users.cli(users.member, home, *args)
            assert res.returncode == 1 and "belongs to another user" in res.stderr, (args, res)
        assert json.loads(vm_home.cli("vm", "show", "roots", "--json", check=True).stdout)["state"] == "created"
        # max_vms_per_user = 2: the member's second VM is fine, the third is refused.
        ok = users.cli(users.member, home, "vm", "create", "--name", "second", "--no-start")
        assert ok.returncode == 0, ok.stderr
        no = users.cli(users.member, home, "vm", "create", "--name", "third", "--no-start")
        assert no.returncode == 1 and "max_vms_per_user" in no.stderr, no
    finally:
        for name in ("roots", "second"):
            vm_home.cli("vm", "rm", "-f", name)


def test_member_cp_is_limited_to_what_the_member_may_touch(users: Users, vm_home: BangerEnv, member_vm: str) -> None:
    home = vm_home.home
    out = users.cli(users.member, home, "vm", "cp", f"{member_vm}:/etc/hostname", "/root/x")
    assert out.returncode == 1 and "permission denied" in out.stderr, out
    assert not Path("/root/x").exists()
    into = users.cli(users.member, home, "vm", "cp", "/etc/shadow", f"{member_vm}:/tmp/")
    assert into.returncode != 0, into
    check = users.cli(users.member, home, "vm", "exec", member_vm, "--", "test", "-e", "/tmp/shadow")
    assert check.returncode == 1, check
    # What the member may touch works, and what lands on the host is theirs.
    work = users.workdir(users.member)
    got = users.cli(users.member, home, "vm", "cp", f"{member_vm}:/etc/hostname", str(work / "h"))
    assert got.returncode == 0, got.stderr
    hostname = vm_home.cli("vm", "exec", member_vm, "--", "cat", "/etc/hostname", check=True).stdout
    assert (work / "h").read_text() == hostname and hostname
    assert (os.stat(work / "h").st_uid, os.stat(work / "h").st_gid) == (users.member.uid, users.member.gid)
    (work / "d").mkdir()
    (work / "d" / "f").write_text("from the member")
    os.chown(work / "d", users.member.uid, users.member.gid)
    os.chown(work / "d" / "f", users.member.uid, users.member.gid)
    put = users.cli(users.member, home, "vm", "cp", str(work / "d"), f"{member_vm}:/tmp/")
    assert put.returncode == 0, put.stderr
    cat = users.cli(users.member, home, "vm", "exec", member_vm, "--", "cat", "/tmp/d/f")
    assert cat.stdout == "from the member", cat
    (work / "one").write_text("a single file")
    os.chown(work / "one", users.member.uid, users.member.gid)
    os.chmod(work / "one", 0o640)
    assert users.cli(users.member, home, "vm", "cp", str(work / "one"), f"{member_vm}:/tmp/one").returncode == 0
    mode = users.cli(users.member, home, "vm", "exec", member_vm, "--", "stat", "-c", "%a %s", "/tmp/one")
    assert mode.stdout.split() == ["640", str(len("a single file"))], mode


def test_root_cp_works_as_before(vm_home: BangerEnv, member_vm: str, tmp_path: Path) -> None:
    vm_home.cli("vm", "cp", f"{member_vm}:/etc/hostname", str(tmp_path / "x"), check=True)
    assert (tmp_path / "x").read_text() == vm_home.cli("vm", "exec", member_vm, "--", "cat", "/etc/hostname").stdout
    vm_home.cli("vm", "cp", "/etc/shadow", f"{member_vm}:/tmp/", check=True)
    assert vm_home.cli("vm", "exec", member_vm, "--", "test", "-s", "/tmp/shadow").returncode == 0


def test_members_see_the_events_of_their_own_vms_only(users: Users, vm_home: BangerEnv) -> None:
    """`daemon.events` (what `banger events` and the web UI relay) for a member: its own VMs' events, from creation
    to removal, and none of another user's. The subscriber is a raw client run as the member, so that the test
    can wait for the daemon's `subscribed` before it acts (the CLI does not print that one)."""
    import queue
    import subprocess
    import threading

    home = vm_home.home
    probe = [str(users.python), "-c", _EVENTS_PROBE, str(home)]
    watcher = subprocess.Popen(["runuser", "-u", users.member.name, "--", *probe], stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert watcher.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in watcher.stdout], daemon=True).start()  # type: ignore[union-attr]

    def next_event() -> dict[str, object]:
        event: dict[str, object] = json.loads(lines.get(timeout=120))
        return event

    try:
        assert next_event()["type"] == "subscribed"
        vm_home.cli("vm", "create", "--name", "roots-ev", "--no-start", check=True)
        made = users.cli(users.member, home, "vm", "create", "--name", "mine-ev", "--no-start")
        assert made.returncode == 0, made.stderr
        gone = users.cli(users.member, home, "vm", "rm", "mine-ev")
        assert gone.returncode == 0, gone.stderr
        vm_home.cli("vm", "rm", "roots-ev", check=True)
        seen: list[dict[str, object]] = []
        while not any(e.get("type") == "vm.removed" and e.get("vm") == "mine-ev" for e in seen):
            try:
                seen.append(next_event())
            except queue.Empty:
                raise AssertionError(f"no more events after {seen}") from None
    finally:
        watcher.kill()
        watcher.wait(timeout=30)
        vm_home.cli("vm", "rm", "-f", "roots-ev")
    names = {e.get("vm") for e in seen if "vm_id" in e}
    assert names == {"mine-ev"}, seen
    assert {"vm.created", "vm.removed"} <= {e["type"] for e in seen if e.get("vm") == "mine-ev"}, seen


_EVENTS_PROBE = """
import json, sys
from pathlib import Path
from banger.rpc.client import Client
def show(_method, params):
    print(json.dumps(params.get("event")), flush=True)
with Client(Path(sys.argv[1]) / "run" / "bangerd.sock") as c:
    c.call("daemon.events", {}, on_notify=show)
"""
