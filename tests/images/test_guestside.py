"""Guest side: the init stub's contract, rootfs checks, and what add_guest_side writes (with merged /usr links)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from banger.errors import InvalidInputError
from banger.images.guestside import add_guest_side, check_rootfs, resolve_in_root, stub_bytes
from banger.images.spec import ImageInfo

INFO = ImageInfo(
    name="t",
    source="import:/x",
    preset=None,
    suite=None,
    mirror=None,
    packages=[],
    arch="x86_64",
    size_bytes=1,
    rootfs_bytes=1,
    banger_version="9.9",
)


def _exe(path: Path, data: bytes = b"#!/bin/true\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o755)


def _merged_usr_root(root: Path, *, stdlib: tuple[str, ...] = ("asyncio/", "json/", "pty.py")) -> Path:
    """A skeleton laid out like Debian's merged /usr; the executables are placeholders (only paths are checked)."""
    for d in ("bin", "sbin", "lib"):
        os.symlink(f"usr/{d}", root / d)
    _exe(root / "usr/bin/dash")
    os.symlink("dash", root / "usr/bin/sh")
    _exe(root / "usr/bin/mount")
    _exe(root / "usr/bin/python3.11")
    os.symlink("python3.11", root / "usr/bin/python3")
    lib = root / "usr/lib/python3.11"
    lib.mkdir(parents=True)
    for m in stdlib:
        (lib / m.rstrip("/")).mkdir() if m.endswith("/") else (lib / m).write_text("")
    (root / "etc").mkdir()
    return root


def test_stub_is_posix_sh_and_keeps_its_contract() -> None:
    stub = stub_bytes().decode()
    assert stub.startswith("#!/bin/sh\n")
    for needle in ("/dev/vdb", "/run/banger/seed", "python3", "init.py", "banger-init: ERROR:", "banger.seed="):
        assert needle in stub
    # Both dash (Debian's sh) and bash in POSIX mode must parse it.
    for shell in (["dash", "-n"], ["bash", "--posix", "-n"]):
        subprocess.run([*shell, "/dev/stdin"], input=stub.encode(), check=True)
    assert len(stub) < 4096


def test_resolve_in_root_follows_links_inside_root(tmp_path: Path) -> None:
    root = _merged_usr_root(tmp_path)
    os.symlink("/../../../usr/bin/python3", root / "usr/bin/escape")
    assert resolve_in_root(root, "/bin/sh") == root / "usr/bin/dash"
    assert resolve_in_root(root, "/usr/bin/escape") == root / "usr/bin/python3.11"
    os.symlink("loop", root / "loop")
    assert resolve_in_root(root, "/loop") is None
    assert resolve_in_root(root, "/nope/x") is None


def test_check_rootfs_accepts_full_python(tmp_path: Path) -> None:
    root = _merged_usr_root(tmp_path)
    assert check_rootfs(root) == ["iproute2", "procps"]
    _exe(root / "usr/sbin/ip")
    _exe(root / "usr/bin/ps")
    assert check_rootfs(root) == []


def test_check_rootfs_missing_python(tmp_path: Path) -> None:
    root = _merged_usr_root(tmp_path)
    (root / "usr/bin/python3").unlink()
    with pytest.raises(InvalidInputError, match="lacks python3") as exc:
        check_rootfs(root)
    assert exc.value.hint and "python3" in exc.value.hint


def test_check_rootfs_python_minimal(tmp_path: Path) -> None:
    root = _merged_usr_root(tmp_path, stdlib=("json/",))
    with pytest.raises(InvalidInputError, match="asyncio, json, pty"):
        check_rootfs(root)


def test_check_rootfs_missing_shell_and_mount(tmp_path: Path) -> None:
    root = _merged_usr_root(tmp_path)
    (root / "usr/bin/mount").unlink()
    with pytest.raises(InvalidInputError, match="mount"):
        check_rootfs(root)
    (root / "usr/bin/dash").unlink()
    with pytest.raises(InvalidInputError, match="/bin/sh"):
        check_rootfs(root)


def test_add_guest_side_follows_merged_usr_and_replaces_host_files(tmp_path: Path) -> None:
    root = _merged_usr_root(tmp_path)
    host_file = tmp_path.parent / f"{tmp_path.name}-host-resolv"
    host_file.write_text("nameserver 10.0.0.1\n")
    os.symlink(str(host_file), root / "etc/resolv.conf")
    add_guest_side(root, INFO)
    stub = root / "usr/sbin/banger-init"
    assert stub.read_bytes() == stub_bytes() and stat.S_IMODE(stub.stat().st_mode) == 0o755
    assert json.loads((root / "etc/banger/image.json").read_text())["banger_version"] == "9.9"
    resolv = root / "etc/resolv.conf"
    assert not resolv.is_symlink() and resolv.read_bytes() == b""
    assert host_file.read_text() == "nameserver 10.0.0.1\n"
    assert (root / "etc/hostname").read_text() == "banger\n"
    console = os.lstat(root / "dev/console")
    assert stat.S_ISCHR(console.st_mode) and os.major(console.st_rdev) == 5 and os.minor(console.st_rdev) == 1
    host_file.unlink()


def test_add_guest_side_refuses_dev_symlink(tmp_path: Path) -> None:
    root = _merged_usr_root(tmp_path)
    os.symlink("/dev", root / "dev")
    with pytest.raises(InvalidInputError, match="/dev"):
        add_guest_side(root, INFO)
