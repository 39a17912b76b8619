"""A daemon with the real Debian kernel and image installed, for tests that boot VMs through the CLI.

Booting under QEMU TCG costs seconds per VM, so the installed state root is shared by a whole module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, BangerEnv
from tests.images.conftest import ROOTFS_CACHE, debian_image, debian_rootfs_tar  # noqa: F401  (fixtures re-exported)
from tests.kernels.conftest import debian_kernel  # noqa: F401

KERNEL = "debian-cloud"
IMAGE = "debian-bookworm"


def _console_tails(home: Path) -> str:
    out = []
    for log in sorted((home / "vms").glob("*/console.log")):
        out.append(f"--- {log} (last 40 lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def vm_home(debian_kernel: Path, debian_image: Path) -> Iterator[BangerEnv]:  # noqa: F811
    """A state root with the kernel imported and the image built (from the shared bootstrap cache)."""
    with installed_home(debian_kernel) as benv:
        yield benv


@contextlib.contextmanager
def installed_home(kernel_dir: Path, wrap: tuple[str, ...] = (), config: str = "") -> Iterator[BangerEnv]:
    """A fresh state root with `kernel_dir` imported and the default image built; everything torn down after."""
    # Short path: QEMU's sockets live under it and Unix socket paths are limited to 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="bgv", dir="/tmp"))
    if config:
        (home / "config.toml").write_text(config)
    env = dict(os.environ, BANGER_HOME=str(home), PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    env.pop("BANGER_NO_AUTOSTART", None)
    benv = BangerEnv(home=home, env=env, wrap=wrap)
    (home / "cache").mkdir(parents=True)
    # Share the bootstrapped rootfs tarballs with tests/images, so this "build" is the warm path.
    (home / "cache" / "images").symlink_to(ROOTFS_CACHE)
    benv.cli("kernel", "import", str(kernel_dir), "--name", KERNEL, "--distro", "debian", check=True)
    benv.cli("image", "build", IMAGE, "--preset", "debian", check=True, timeout=900)
    try:
        yield benv
    finally:
        tails = _console_tails(home)
        if tails:
            print(tails)  # shown by pytest for failing tests (-ra keeps the output of failures)
        for vm in (home / "vms").glob("*"):
            benv.cli("vm", "rm", "-f", vm.name, timeout=120)
        benv.stop_daemon()
        _kill_strays(home)
        shutil.rmtree(home, ignore_errors=True)


def _kill_strays(home: Path) -> None:
    """Any VMM still running with files under this root would outlive the test: kill it, loudly."""
    out = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
            print(f"killed stray process {pid} using {home}")
        except ProcessLookupError:
            pass
