"""Host-side workspace git (banger.workspace.hostgit) with the guest's scripts run by a local shell.

The guest scripts (banger.workspace.guestscripts) are plain sh + git, so running them here on a scratch directory
is a faithful stand-in for the guest's side of the round trip; tests/workspace/test_workspace_vm.py runs the same
round trip through real guests.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.errors import AlreadyExistsError, BangerError, InvalidInputError
from banger.workspace import guestscripts as gs
from banger.workspace import hostgit
from tests.workspace.repos import fingerprint, git, host_state, make_repo


def _guest(script: str, *args: str, cwd: Path) -> str:
    return subprocess.run(gs.argv(script, *args), cwd=cwd, capture_output=True, check=True, text=True).stdout


def _clone_like_the_guest(tmp_path: Path, repo: Path, snap: hostgit.Snapshot) -> Path:
    bundle = tmp_path / "in.bundle"
    hostgit.make_bundle(snap, bundle)
    dest = tmp_path / "guest" / repo.name
    dest.mkdir(parents=True)
    _guest(gs.CLONE, str(dest), str(bundle), snap.ref, snap.head, snap.branch or "", "G", "g@example.org", cwd=dest)
    assert not bundle.exists()
    return dest


def test_snapshot_carries_what_the_user_sees_and_touches_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    before = host_state(repo)
    snap = hostgit.make_snapshot(repo, "vm1")
    assert host_state(repo) == before
    assert git(repo, "rev-parse", "refs/banger/vm1/base").strip() == snap.commit
    assert git(repo, "rev-parse", f"{snap.commit}^").strip() == snap.head and snap.branch == "main"
    files = set(git(repo, "ls-tree", "-r", "--name-only", snap.commit).split())
    assert "untracked.txt" in files and "ignored.log" not in files and "gone.txt" not in files
    guest = _clone_like_the_guest(tmp_path, repo, snap)
    expected = {k: v for k, v in fingerprint(repo).items() if k != "ignored.log"}
    assert fingerprint(guest) == expected
    status = set(git(guest, "status", "--porcelain").splitlines())
    assert status == {" M tracked.txt", " D gone.txt", "?? untracked.txt", '?? "we[ir]d *.txt"'}
    assert git(guest, "log", "--format=%s").split() == ["first"]
    assert git(guest, "config", "user.name").strip() == "G"


def test_export_brings_back_exactly_the_guest_changes(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    snap = hostgit.make_snapshot(repo, "vm2")
    guest = _clone_like_the_guest(tmp_path, repo, snap)
    git(guest, "mv", "rename-me.txt", "renamed.txt")
    git(guest, "rm", "-q", "data.bin")
    git(guest, "commit", "-q", "-am", "guest commit")
    (guest / "keep.txt").chmod(0o755)
    (guest / "sub" / "tool.py").write_text("print('edited')\n")
    (guest / "new.txt").write_text("new\n")
    before = host_state(repo)
    out = _guest(gs.PREPARE, str(guest), snap.commit, snap.head, cwd=guest)
    assert "ahead 1" in out.splitlines()
    bundle = tmp_path / "out.bundle"
    bundle.write_bytes(
        subprocess.run(gs.argv(gs.BUNDLE, str(guest), snap.commit, snap.head), capture_output=True, check=True).stdout
    )
    with hostgit.checked_objects(repo, bundle, "refs/banger/export") as scratch:
        tip = hostgit.fetch_checked(scratch, repo, "refs/banger/export", "refs/banger/vm2/export")
    hostgit.set_branch(repo, "banger/vm2", tip, force=False)
    changes = set(git(repo, "diff", "--name-status", "-M", snap.commit, "banger/vm2").splitlines())
    assert changes == {
        "R100\trename-me.txt\trenamed.txt",
        "D\tdata.bin",
        "M\tkeep.txt",
        "M\tsub/tool.py",
        "A\tnew.txt",
    }
    assert "100755 blob" in git(repo, "ls-tree", "banger/vm2", "keep.txt")
    assert host_state(repo) == before
    with pytest.raises(AlreadyExistsError):
        hostgit.set_branch(repo, "banger/vm2", snap.head, force=False)
    hostgit.set_branch(repo, "banger/vm2", snap.head, force=True)
    with pytest.raises(InvalidInputError):
        hostgit.set_branch(repo, "main", tip, force=True)  # the checked-out branch is never moved


def test_fetch_refuses_objects_fsck_rejects(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    snap = hostgit.make_snapshot(repo, "vm3")
    evil = tmp_path / "evil"
    git(tmp_path, "clone", "-q", str(repo), str(evil))
    blob = git(evil, "hash-object", "-w", "--stdin", input=b"[core]\n\tfsmonitor = touch /tmp/pwned\n").strip()
    inner = git(evil, "mktree", input=f"100644 blob {blob}\tconfig\n".encode()).strip()
    tree = git(evil, "mktree", input=f"040000 tree {inner}\t.git\n".encode()).strip()
    commit = git(evil, "commit-tree", tree, "-p", snap.head, "-m", "evil").strip()
    git(evil, "update-ref", "refs/banger/export", commit)
    bundle = tmp_path / "evil.bundle"
    git(evil, "bundle", "create", "-q", str(bundle), "refs/banger/export", f"^{snap.head}")
    with pytest.raises(BangerError, match="fsck|dotgit|hasDotgit"):
        with hostgit.checked_objects(repo, bundle, "refs/banger/export") as scratch:
            hostgit.fetch_checked(scratch, repo, "refs/banger/export", "refs/banger/vm3/export")
    probe = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", commit], capture_output=True)
    assert probe.returncode != 0  # the bad commit never reached the user's repository


def test_not_a_checkout_and_no_commits(tmp_path: Path) -> None:
    assert hostgit.toplevel(tmp_path) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(InvalidInputError, match="no commits"):
        hostgit.make_snapshot(empty, "vm4")
