"""Real host users for the access tests: one in the daemon's socket group, one outside it, and a Python they can run.

The users and the group are created with useradd/groupadd for the session and removed at teardown. Their CLI runs
under Debian's /usr/bin/python3 (root's pyenv interpreter is unreachable for them) in a throwaway venv that sees
this checkout's packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from banger.drivers import cgroups
from tests.conftest import VENV_BIN, BangerEnv, CliResult
from tests.images.conftest import debian_image, debian_rootfs_tar  # noqa: F401
from tests.kernels.conftest import debian_kernel  # noqa: F401

DEBIAN_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class HostUser:
    name: str
    uid: int
    gid: int


@dataclass
class Users:
    group: str
    gid: int
    member: HostUser
    outsider: HostUser
    python: Path
    workdirs: list[Path] = field(default_factory=list)
    homes: dict[str, Path] = field(default_factory=dict)

    def cli(self, user: HostUser, home: Path, *args: str, timeout: float = 300) -> CliResult:
        """Run the real CLI as `user`, with no BANGER_HOME: it must find the system daemon at `home` itself."""
        env = [
            "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
            f"HOME={self.homes[user.name]}",
            "LC_ALL=C.UTF-8",
            f"BANGER_SYSTEM_HOME={home}",
        ]
        argv = ["runuser", "-u", user.name, "--", "env", "-i", *env, str(self.python), "-m", "banger.cli.main", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def rpc(self, user: HostUser, home: Path, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One raw RPC call as `user` (past the CLI's own checks): {"result": ...} or {"error": {code, message}}."""
        probe = [str(self.python), "-c", _RPC_PROBE, str(home), method, json.dumps(params)]
        proc = subprocess.run(["runuser", "-u", user.name, "--", *probe], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        reply: dict[str, Any] = json.loads(proc.stdout)
        return reply

    def run_as(self, user: HostUser, *argv: str) -> subprocess.CompletedProcess[str]:
        """Any command as `user` (to check what they could do without banger)."""
        return subprocess.run(["runuser", "-u", user.name, "--", *argv], capture_output=True, text=True, timeout=60)

    def workdir(self, user: HostUser) -> Path:
        """A directory only `user` can write to (removed at the end of the session)."""
        path = Path(tempfile.mkdtemp(prefix=f"bgs-{user.name}-", dir="/tmp"))
        os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o700)
        self.workdirs.append(path)
        return path


_RPC_PROBE = """
import json, sys
from pathlib import Path
from banger.errors import BangerError
from banger.rpc.client import Client
try:
    with Client(Path(sys.argv[1]) / "run" / "bangerd.sock") as c:
        print(json.dumps({"result": c.call(sys.argv[2], json.loads(sys.argv[3]))}))
except BangerError as exc:
    print(json.dumps({"error": {"code": int(exc.code), "message": exc.message}}))
"""


def _useradd(name: str, *groups: str) -> HostUser:
    argv = ["useradd", "--no-create-home", "--shell", "/bin/sh", "--user-group"]
    if groups:
        argv += ["--groups", ",".join(groups)]
    subprocess.run([*argv, name], check=True, capture_output=True, timeout=30)
    ids = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout
    gid = subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True).stdout
    return HostUser(name, int(ids), int(gid))


@pytest.fixture(scope="session")
def users() -> Iterator[Users]:
    """A group, a member and an outsider (real passwd entries), and a venv on Debian's python for them."""
    tag = secrets.token_hex(3)
    group = f"bgt{tag}"
    made: list[str] = []
    venv = Path(tempfile.mkdtemp(prefix="bgs-venv-", dir="/tmp"))
    try:
        subprocess.run(["groupadd", group], check=True, capture_output=True, timeout=30)
        member = _useradd(f"bgm{tag}", group)
        made.append(member.name)
        outsider = _useradd(f"bgo{tag}")
        made.append(outsider.name)
        gid = int(subprocess.run(["getent", "group", group], capture_output=True, text=True).stdout.split(":")[2])
        subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        site = next((venv / "lib").glob("python3*/site-packages"))
        ours = next((VENV_BIN.parent / "lib").glob("python3*/site-packages"))
        # Same CPython minor version, so the checkout's installed packages (and its editable banger) import fine.
        (site / "banger-checkout.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
        os.chmod(venv, 0o755)
        users = Users(group, gid, member, outsider, venv / "bin" / "python")
        for u in (member, outsider):
            users.homes[u.name] = users.workdir(u)
        yield users
        for d in users.workdirs:
            shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
        for name in made:
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while subprocess.run(["userdel", name], capture_output=True, timeout=30).returncode == 8:
                if time.monotonic() > deadline:  # 8: the user still has processes (dying from the SIGKILL)
                    break
                time.sleep(0.1)
        subprocess.run(["groupdel", group], capture_output=True, timeout=30)


@contextlib.contextmanager
def group_home(users: Users, config: str = "") -> Iterator[BangerEnv]:
    """A state root under /tmp (so others can traverse to it) whose daemon opens its socket to the test group."""
    home = Path(tempfile.mkdtemp(prefix="bgs", dir="/tmp"))
    (home / "config.toml").write_text(f'socket_group = "{users.group}"\n{config}')
    env = dict(os.environ, BANGER_HOME=str(home), PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    env.pop("BANGER_NO_AUTOSTART", None)
    benv = BangerEnv(home=home, env=env)
    try:
        yield benv
    finally:
        for vm in (home / "vms").glob("*") if (home / "vms").exists() else []:
            benv.cli("vm", "rm", "-f", vm.name, timeout=120)
        benv.stop_daemon()
        shutil.rmtree(home, ignore_errors=True)
        with contextlib.suppress(OSError):
            cgroups.collect()


@pytest.fixture
def group_daemon(users: Users) -> Iterator[BangerEnv]:
    """A running daemon (no kernels or images) whose socket group is the test group."""
    with group_home(users, "max_vcpus = 4\nmax_memory_mib = 2048\n") as benv:
        benv.cli("daemon", "start", check=True)
        yield benv


@pytest.fixture(scope="session")
def vm_home(users: Users, debian_kernel: Path, debian_image: Path) -> Iterator[BangerEnv]:  # noqa: F811
    """A group-open state root with the kernel and image installed (shared by the VM tests of this package,
    each with VMs of its own); a member may own two VMs."""
    from tests.images.conftest import ROOTFS_CACHE

    with group_home(users, "max_vms_per_user = 2\n") as benv:
        (benv.home / "cache").mkdir(parents=True)
        (benv.home / "cache" / "images").symlink_to(ROOTFS_CACHE)
        benv.cli("kernel", "import", str(debian_kernel), "--name", "debian-cloud", "--distro", "debian", check=True)
        benv.cli("image", "build", "debian-bookworm", "--preset", "debian", check=True, timeout=900)
        yield benv


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False
