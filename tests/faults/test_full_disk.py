"""A full disk under the state root (issue 9, item 13): kernel import, image build, vm create and vm cp fail with a
clear error, leave nothing half-written, the daemon keeps serving, and the same work succeeds once space is freed.

The state root lives on a small ext4 filesystem the test makes (a loop-mounted sparse file, no reserved blocks, so
root cannot dip into a reserve), filled with a ballast file to leave only a little room. Kernel pull needs the
network, so kernel import (the same install path, fed from a local directory) stands in for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, BangerEnv
from tests.images.conftest import ROOTFS_CACHE
from tests.vms.conftest import IMAGE, KERNEL

from .conftest import TEMP_NAME

pytestmark = [pytest.mark.vm, pytest.mark.faults]

# Room for the kernel, the image and a VM whose 2 GiB root disk must fit the free space (vms/limits.py).
FS_MIB = 3072
MIB = 1024 * 1024


@contextlib.contextmanager
def small_fs() -> Iterator[Path]:
    """A fresh ext4 filesystem of FS_MIB, mounted; unmounted and deleted after."""
    work = Path(tempfile.mkdtemp(prefix="bgfd", dir="/tmp"))
    img, mnt = work / "fs.img", work / "m"
    mnt.mkdir()
    with img.open("wb") as f:
        f.truncate(FS_MIB * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", "-F", str(img)], check=True, timeout=120)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, timeout=60)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


class Ballast:
    """A file that takes all free space on a filesystem but `leave` bytes."""

    def __init__(self, fs: Path) -> None:
        self.path = fs / "ballast"

    def fill(self, leave: int) -> None:
        self.free()
        st = os.statvfs(self.path.parent)
        size = st.f_bavail * st.f_frsize - leave
        if size > 0:
            subprocess.run(["fallocate", "-l", str(size), str(self.path)], check=True, timeout=60)

    def free(self) -> None:
        self.path.unlink(missing_ok=True)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_symlink()} if root.exists() else set()


def assert_clean_failure(env: BangerEnv, result: object, before: set[Path]) -> None:
    """A one-line error, the daemon still answering, and no file left that was not there before."""
    code, err = result.returncode, result.stderr  # type: ignore[attr-defined]
    assert code != 0, "the operation succeeded on a full disk"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # the rest: progress, a hint
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert "space" in err.lower() or "full" in err.lower() or "no room" in err.lower(), err
    assert env.cli("daemon", "status", timeout=60).returncode == 0
    leftovers = sorted(str(p) for p in files_under(env.home) - before if "logs" not in p.parts)
    assert leftovers == [], f"half-written files left behind: {leftovers}"
    assert [p for p in files_under(env.home) if TEMP_NAME.search(p.name)] == []


def test_full_disk_fails_cleanly_and_recovers(debian_kernel: Path, debian_image: Path) -> None:
    with small_fs() as fs:
        home = fs / "h"
        env_vars = dict(os.environ, BANGER_HOME=str(home), PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
        env_vars.pop("BANGER_NO_AUTOSTART", None)
        env = BangerEnv(home=home, env=env_vars)
        (home / "cache").mkdir(parents=True)
        (home / "cache" / "images").symlink_to(ROOTFS_CACHE)
        ballast = Ballast(fs)
        try:
            env.cli("daemon", "start", check=True)

            # Kernel install.
            ballast.fill(leave=24 * MIB)
            before = files_under(home)
            r = env.cli("kernel", "import", str(debian_kernel), "--name", KERNEL, "--distro", "debian", timeout=300)
            assert_clean_failure(env, r, before)
            assert json.loads(env.cli("kernel", "list", "--json", check=True).stdout) == []
            ballast.free()
            env.cli("kernel", "import", str(debian_kernel), "--name", KERNEL, "--distro", "debian", check=True)

            # Image build (from the warm rootfs cache, which lives elsewhere).
            ballast.fill(leave=64 * MIB)
            before = files_under(home)
            r = env.cli("image", "build", IMAGE, "--preset", "debian", timeout=900)
            assert_clean_failure(env, r, before)
            assert json.loads(env.cli("image", "list", "--json", check=True).stdout) == []
            ballast.free()
            env.cli("image", "build", IMAGE, "--preset", "debian", check=True, timeout=900)

            # VM create: its root disk is a copy of the image.
            ballast.fill(leave=8 * MIB)
            before = files_under(home)
            r = env.cli("vm", "create", "--name", "full", "--net", "none", "--no-start", timeout=300)
            assert_clean_failure(env, r, before)
            assert json.loads(env.cli("vm", "ls", "--json", check=True).stdout) == []
            ballast.free()
            env.cli("vm", "create", "--name", "cp", "--net", "none", "--vcpus", "1", "--memory", "256", check=True)

            # vm cp out of the guest onto the full filesystem.
            dest = fs / "dest"
            dest.mkdir()
            make = "head -c 20000000 /dev/urandom > /tmp/big"
            env.cli("vm", "exec", "cp", "--", "sh", "-c", make, check=True)
            ballast.fill(leave=4 * MIB)
            before = files_under(home) | files_under(dest)
            r = env.cli("vm", "cp", "cp:/tmp/big", str(dest), timeout=300)
            assert r.returncode != 0 and "\nerror: " in "\n" + r.stderr and "internal error" not in r.stderr, r.stderr
            assert sorted(files_under(dest)) == [], "a half-copied file was left in the destination"
            assert env.cli("daemon", "status", timeout=60).returncode == 0
            ballast.free()
            env.cli("vm", "cp", "cp:/tmp/big", str(dest), check=True, timeout=300)
            assert (dest / "big").stat().st_size == 20000000
        finally:
            ballast.free()
            with contextlib.suppress(Exception):
                for vm in json.loads(env.cli("vm", "ls", "--json", timeout=60).stdout or "[]"):
                    env.cli("vm", "rm", "-f", vm["name"], timeout=120)
            env.stop_daemon()
