"""Safe rootfs extraction: traversal refused, nothing written through symlinks, devices skipped, owners kept."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from banger.errors import UnsafeArchiveError
from banger.images.tarball import extract_rootfs, is_probably_tar, pack_rootfs
from banger.progress import no_progress
from tests.tarfilters import tar_filters  # noqa: F401  (autouse: the module runs with and without filters)


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"", link: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _extract(tmp_path: Path, tar: Path) -> Path:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_rootfs(tar, dest, progress=no_progress, step="extract")
    return dest


def test_rootfs_features_kept(tmp_path: Path) -> None:
    dev = _member("dev/null", tarfile.CHRTYPE)
    dev[0].devmajor, dev[0].devminor = 1, 3
    owned = _member("home/u/f", data=b"x")
    owned[0].uid, owned[0].gid = 1234, 4321
    tar = _tar(
        tmp_path / "r.tar",
        [
            _member("./usr/bin/", tarfile.DIRTYPE, mode=0o755),
            _member("/usr/bin/su", data=b"elf", mode=0o4755),
            _member("usr/bin/abs-link", tarfile.SYMTYPE, link="/etc/alternatives/x"),
            _member("usr/bin/su-hard", tarfile.LNKTYPE, link="./usr/bin/su", mode=0o4755),
            _member("run/fifo", tarfile.FIFOTYPE),
            dev,
            owned,
        ],
    )
    dest = _extract(tmp_path, tar)
    su = dest / "usr/bin/su"
    assert su.read_bytes() == b"elf" and stat.S_IMODE(su.stat().st_mode) == 0o4755
    assert os.readlink(dest / "usr/bin/abs-link") == "/etc/alternatives/x"
    assert os.stat(dest / "usr/bin/su-hard").st_ino == su.stat().st_ino
    assert stat.S_ISFIFO(os.lstat(dest / "run/fifo").st_mode)
    assert not (dest / "dev/null").exists()
    assert (os.stat(dest / "home/u/f").st_uid, os.stat(dest / "home/u/f").st_gid) == (1234, 4321)


def test_dotdot_refused(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "r.tar", [_member("etc/../../escape", data=b"x")])
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        _extract(tmp_path, tar)
    assert not (tmp_path / "escape").exists()


def test_write_through_symlink_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tar = _tar(
        tmp_path / "r.tar",
        [_member("etc", tarfile.SYMTYPE, link=str(outside)), _member("etc/passwd", data=b"pwned")],
    )
    with pytest.raises(UnsafeArchiveError, match="non-directory"):
        _extract(tmp_path, tar)
    assert list(outside.iterdir()) == []


def test_later_file_replaces_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("safe")
    tar = _tar(
        tmp_path / "r.tar",
        [_member("f", tarfile.SYMTYPE, link=str(victim)), _member("f", data=b"new")],
    )
    dest = _extract(tmp_path, tar)
    assert victim.read_text() == "safe"
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"new"


def test_hardlink_through_symlink_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow").write_text("host secret")
    tar = _tar(
        tmp_path / "r.tar",
        [_member("s", tarfile.SYMTYPE, link=str(secret)), _member("leak", tarfile.LNKTYPE, link="s/shadow")],
    )
    with pytest.raises(UnsafeArchiveError, match="non-directory"):
        _extract(tmp_path, tar)


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2", "zst"])
def test_compressions(tmp_path: Path, mode: str) -> None:
    members = [_member("etc/os-release", data=b"ID=test\n")]
    if mode == "zst":
        plain = _tar(tmp_path / "r.tar", members)
        tar = tmp_path / "r.tar.zst"
        tar.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    else:
        tar = _tar(tmp_path / "r.tar.x", members, mode)
    assert is_probably_tar(tar)
    assert (_extract(tmp_path, tar) / "etc/os-release").read_bytes() == b"ID=test\n"


def test_not_a_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00hello" * 100)
    assert not is_probably_tar(junk)
    (tmp_path / "dest").mkdir()
    with pytest.raises(UnsafeArchiveError, match="tar"):
        extract_rootfs(junk, tmp_path / "dest", progress=no_progress, step="x")


def test_pack_then_extract_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "usr/bin/tool", 0o755)
    os.symlink("usr/bin", src / "bin")
    os.chown(src / "usr/bin/tool", 7, 8)
    out = tmp_path / "out.tar"
    pack_rootfs(src, out, progress=no_progress, step="pack")
    dest = _extract(tmp_path, out)
    tool = dest / "usr/bin/tool"
    assert tool.read_bytes() == b"#!/bin/sh\n" and stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert (tool.stat().st_uid, tool.stat().st_gid) == (7, 8)
    assert os.readlink(dest / "bin") == "usr/bin"


def test_xattrs_restored(tmp_path: Path) -> None:
    info, data = _member("usr/bin/ping", data=b"elf", mode=0o755)
    info.pax_headers = {"SCHILY.xattr.user.banger": "cap-ish"}
    tar = _tar(tmp_path / "r.tar", [(info, data)], "w")
    dest = _extract(tmp_path, tar)
    assert os.getxattr(dest / "usr/bin/ping", "user.banger") == b"cap-ish"
