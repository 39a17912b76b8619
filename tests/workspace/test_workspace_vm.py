"""Workspaces through real guests (QEMU TCG), the real daemon and the real CLI: in, changes, out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, BangerEnv
from tests.vms.conftest import debian_image, debian_kernel, vm_home  # noqa: F401
from tests.workspace.repos import GUEST_FINGERPRINT, fingerprint, git, host_state, make_repo

pytestmark = pytest.mark.vm

SMALL = ("--net", "none", "--vcpus", "1", "--memory", "512")


def _exec(env: BangerEnv, vm: str, *argv: str) -> str:
    return env.cli("vm", "exec", vm, "--", *argv, check=True, timeout=300).stdout


def _hostile_config(markers: list[Path]) -> str:
    """A guest script that arms the workspace's .git with everything that could run code on a host git."""
    m1, m2, m3, m4 = (str(m) for m in markers)
    return f"""set -e
git config core.fsmonitor "touch {m1}"
mkdir -p /tmp/hooks .git/hooks
for h in pre-commit post-commit reference-transaction post-checkout pre-push; do
    printf '#!/bin/sh\\ntouch {m2}\\n' > /tmp/hooks/$h
    cp /tmp/hooks/$h .git/hooks/$h
done
chmod +x /tmp/hooks/* .git/hooks/*
git config core.hooksPath /tmp/hooks
git config filter.evil.clean "touch {m3}; cat"
git config diff.evil.textconv "touch {m4}; cat"
printf '* filter=evil diff=evil\\n' > .gitattributes
"""


def test_round_trip_through_a_real_guest(vm_home: BangerEnv, tmp_path: Path) -> None:  # noqa: F811
    repo = make_repo(tmp_path)
    before = host_state(repo)
    r = vm_home.cli("vm", "create", "--name", "wsa", *SMALL, "--workspace", str(repo), "--json", timeout=900)
    assert r.returncode == 0, r.stderr
    try:
        ws = json.loads(vm_home.cli("vm", "show", "wsa", "--json", check=True).stdout)["workspace"]
        base = git(repo, "rev-parse", "refs/banger/wsa/base").strip()
        assert (ws["host_path"], ws["guest_path"], ws["base_commit"]) == (str(repo), "/workspace/proj", base)
        assert host_state(repo) == before

        # What went in is exactly what the user sees: file by file, content, mode and link target.
        guest_fp = json.loads(_exec(vm_home, "wsa", "python3", "-c", GUEST_FINGERPRINT, "/workspace/proj"))
        assert guest_fp == {k: v for k, v in fingerprint(repo).items() if k != "ignored.log"}
        assert _exec(vm_home, "wsa", "pwd").strip() == "/workspace/proj"
        status = set(_exec(vm_home, "wsa", "git", "status", "--porcelain").splitlines())
        assert status == {" M tracked.txt", " D gone.txt", "?? untracked.txt", '?? "we[ir]d *.txt"'}
        assert _exec(vm_home, "wsa", "git", "log", "--format=%s").split() == ["first"]
        assert _exec(vm_home, "wsa", "git", "config", "user.email").strip() == "host@example.org"

        work = (
            "set -e; git mv rename-me.txt renamed.txt; git rm -q data.bin; git commit -q -am 'guest commit'; "
            "chmod +x keep.txt; echo edited > sub/tool.py; echo new > new.txt; ln -s keep.txt newlink"
        )
        _exec(vm_home, "wsa", "sh", "-c", work)
        st = json.loads(vm_home.cli("vm", "workspace", "status", "wsa", "--json", check=True).stdout)
        assert (st["commits_ahead"], st["changed_files"]) == (1, 6)
        d = vm_home.cli("vm", "workspace", "diff", "wsa", check=True, timeout=300).stdout
        assert "+edited" in d and "rename from rename-me.txt" in d and "new file mode 120000" in d

        r = vm_home.cli("vm", "workspace", "export", "wsa", check=True, timeout=300)
        tip = git(repo, "rev-parse", "banger/wsa").strip()
        assert f"branch banger/wsa at {tip}" in r.stdout and "renamed.txt" in r.stdout
        changes = set(git(repo, "diff", "--name-status", "-M", base, "banger/wsa").splitlines())
        assert changes == {
            "R100\trename-me.txt\trenamed.txt",
            "D\tdata.bin",
            "M\tkeep.txt",
            "M\tsub/tool.py",
            "A\tnew.txt",
            "A\tnewlink",
        }
        assert git(repo, "ls-tree", "banger/wsa", "keep.txt").startswith("100755 blob")
        assert git(repo, "ls-tree", "banger/wsa", "newlink").startswith("120000 blob")
        assert git(repo, "log", "--format=%s", "-2", "banger/wsa").splitlines()[1] == "guest commit"
        assert host_state(repo) == before

        again = vm_home.cli("vm", "workspace", "export", "wsa", timeout=300)
        assert again.returncode == 1 and "already exists" in again.stderr

        # A hostile .git in the guest: export and diff still run nothing of it on the host.
        markers = [Path(f"/tmp/banger-pwned-{uuid.uuid4().hex}") for _ in range(4)]
        _exec(vm_home, "wsa", "sh", "-c", _hostile_config(markers) + "echo more >> new.txt\n")
        vm_home.cli("vm", "workspace", "diff", "wsa", check=True, timeout=300)
        vm_home.cli("vm", "workspace", "export", "wsa", "--force", check=True, timeout=300)
        assert git(repo, "show", "banger/wsa:new.txt") == "new\nmore\n"
        assert not [m for m in markers if m.exists()]
        assert host_state(repo) == before
    finally:
        vm_home.cli("vm", "rm", "-f", "wsa", timeout=300)


def test_vm_run_rm_in_a_checkout_exports_before_removing(vm_home: BangerEnv, tmp_path: Path) -> None:  # noqa: F811
    repo = make_repo(tmp_path, "auto")
    (repo / ".banger.toml").write_text(
        'packages = ["python3-venv"]\n'
        # ensurepip ships in python3-venv only (a real venv would cost minutes of pip under TCG).
        "setup = [\"python3 -c 'import ensurepip; print(6 * 7)' > venv-ok.txt\"]\n"
    )
    markers = [Path(f"/tmp/banger-pwned-{uuid.uuid4().hex}") for _ in range(4)]
    # 12 MiB of incompressible bytes: the upload takes many 1 MiB chunks and fills the CLI's 8 MiB window.
    big = os.urandom(12 * 1024 * 1024)
    (repo / "big.bin").write_bytes(big)
    script = _hostile_config(markers) + "echo hi > made-in-guest.txt\nsha256sum big.bin > big.sha\n"
    # Started inside the checkout, with no --workspace: the checkout is the workspace, and exec starts in it.
    proc = subprocess.run(
        [str(VENV_BIN / "banger"), "vm", "run", "--rm", "--name", "wsb", *SMALL, "--", "sh", "-c", script],
        cwd=repo,
        env=vm_home.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "exported: branch banger/wsb" in proc.stderr and "removed wsb" in proc.stderr
    assert git(repo, "show", "banger/wsb:made-in-guest.txt") == "hi\n"
    assert git(repo, "show", "banger/wsb:big.sha").split()[0] == hashlib.sha256(big).hexdigest()
    # The tooling plan ran: python3-venv came with a derived image, the setup command ran in the workspace.
    assert "setup [1/1]" in proc.stderr and git(repo, "show", "banger/wsb:venv-ok.txt") == "42\n"
    assert not [m for m in markers if m.exists()]
    assert "wsb" not in vm_home.cli("vm", "ls", check=True).stdout


def _image_call(env: BangerEnv, packages: list[str]) -> tuple[dict[str, object], float]:
    from banger.rpc.client import Client

    start = time.monotonic()
    with Client(env.socket) as client:
        res = client.call("vm.workspace.image", {"packages": packages})
    return res, time.monotonic() - start


def test_derived_image_is_built_once_then_reused(vm_home: BangerEnv) -> None:  # noqa: F811
    vm_home.cli("daemon", "start", timeout=60)
    # The home is shared by this module's tests: a derived image with python3-venv that one of them left is removed
    # first, so that the first call below builds it whatever ran before.
    for image in json.loads(vm_home.cli("image", "ls", "--json", check=True).stdout):
        if image["source"] == "derived:debian-bookworm" and "python3-venv" in image.get("packages", []):
            vm_home.cli("image", "rm", image["name"], check=True)
    before = len(vm_home.log_text())
    first, t_first = _image_call(vm_home, ["python3-venv"])
    second, t_second = _image_call(vm_home, ["python3-venv"])
    assert first["derived"] and first["image"] == second["image"]
    assert str(first["image"]).startswith("debian-bookworm-")
    log = vm_home.log_text()[before:]
    assert f"derived image {first['image']}: reusing the cached image (no install)" in log
    assert log.count(f"derived image {first['image']}: installing python3-venv") == 1
    assert t_second < 5 and t_second < t_first
    print(f"derived image: first call {t_first:.1f}s, second {t_second:.2f}s")
    info = json.loads(vm_home.cli("image", "show", str(first["image"]), "--json", check=True).stdout)
    assert "python3-venv" in info["packages"] and info["source"] == "derived:debian-bookworm"
    # The base already has git (the Debian preset includes it): no packages, no derived image.
    plain, _ = _image_call(vm_home, [])
    assert plain == {"image": "debian-bookworm", "derived": False, "packages": []}
