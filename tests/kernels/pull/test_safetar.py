"""Member checks and safe extraction, including property-based tests over hostile names and link targets."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger.errors import BangerError, IntegrityError, UnsafeArchiveError
from banger.kernels.safetar import (
    ForwardReader,
    bundle_modes,
    check_symlink_target,
    extract_tar_stream,
    normalize_member_name,
    unpacked_limit,
)
from tests.kernels.pull.conftest import FAKE_VMLINUX, good_members, reg, special, tar_bytes
from tests.tarfilters import tar_filters  # noqa: F401  (autouse: the module runs with and without filters)

LIMIT = 64 << 20


def extract(data: bytes, dest: Path, limit: int = LIMIT) -> None:
    dest.mkdir(exist_ok=True)
    extract_tar_stream(ForwardReader(io.BytesIO(data), limit), dest, limit=limit)


def test_good_bundle_extracts_with_links(tmp_path: Path) -> None:
    extract(tar_bytes(good_members()), tmp_path / "k")
    k = tmp_path / "k"
    assert (k / "vmlinux").read_bytes() == FAKE_VMLINUX
    assert os.readlink(k / "modules/6.1.99/source") == "kernel"
    ko, again = k / "modules/6.1.99/kernel/virtio.ko", k / "modules/6.1.99/again.ko"
    assert os.stat(ko).st_ino == os.stat(again).st_ino
    assert (k / "modules").stat().st_mode & 0o777 == 0o755
    assert (k / "vmlinux").stat().st_mode & 0o777 == 0o755


def test_modes_are_cleaned_as_the_data_filter_does(tmp_path: Path) -> None:
    members = [
        reg("vmlinux", FAKE_VMLINUX, 0o4777),
        reg("config", b"x", 0o666),
        reg("cmdline", b"x", 0o070),
        special("modules", tarfile.DIRTYPE),
        reg("modules/m.ko", b"x", 0o1755),
    ]
    members[3][0].mode = 0o700
    extract(tar_bytes(members), tmp_path / "k")
    modes = {p: (tmp_path / "k" / p).stat().st_mode & 0o7777 for p in ("vmlinux", "config", "cmdline", "modules")}
    assert modes == {"vmlinux": 0o755, "config": 0o644, "cmdline": 0o640, "modules": 0o755}
    assert (tmp_path / "k/modules/m.ko").stat().st_mode & 0o7777 == 0o755


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="this Python predates tarfile's extraction filters")
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.LNKTYPE])
def test_bundle_modes_are_the_data_filters_for_every_file_mode(tmp_path: Path, kind: bytes) -> None:
    for mode in range(0o10000):
        member = tarfile.TarInfo("modules/m.ko")
        member.type, member.mode, member.linkname = kind, mode, "modules/a.ko" if kind == tarfile.LNKTYPE else ""
        assert bundle_modes(member, str(tmp_path)).mode == tarfile.data_filter(member, str(tmp_path)).mode, oct(mode)


def test_taps_see_exactly_the_bytes_written(tmp_path: Path) -> None:
    big = FAKE_VMLINUX + os.urandom(3 << 20)
    seen: dict[str, list[bytes]] = {"vmlinux": [], "config": []}
    taps = {name: (lambda piece, name=name: seen[name].append(bytes(piece))) for name in seen}
    data = tar_bytes([reg("config", b"cfg"), reg("vmlinux", big)])
    (tmp_path / "k").mkdir()
    extract_tar_stream(ForwardReader(io.BytesIO(data), LIMIT), tmp_path / "k", limit=LIMIT, taps=taps)
    assert b"".join(seen["vmlinux"]) == big == (tmp_path / "k/vmlinux").read_bytes()
    assert seen["config"] == [b"cfg"]


def test_leading_dot_slash_names_are_accepted(tmp_path: Path) -> None:
    members = [special("./", tarfile.DIRTYPE), reg("./vmlinux", FAKE_VMLINUX), reg("./config", b"x")]
    extract(tar_bytes(members), tmp_path / "k")
    assert sorted(os.listdir(tmp_path / "k")) == ["config", "vmlinux"]


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ([reg("/vmlinux", FAKE_VMLINUX)], "absolute path"),
        ([reg("modules/../../evil", b"x")], "leaves the target"),
        ([reg("../evil", b"x")], "leaves the target"),
        ([special("modules", tarfile.DIRTYPE), special("modules/l", tarfile.SYMTYPE, "/etc/passwd")], "absolute"),
        ([special("modules", tarfile.DIRTYPE), special("modules/l", tarfile.SYMTYPE, "../../x")], "leaves"),
        ([special("modules", tarfile.DIRTYPE), special("modules/l", tarfile.SYMTYPE, "a/../../..")], "climbs"),
        ([special("modules/h", tarfile.LNKTYPE, "/etc/passwd")], "absolute path"),
        ([special("modules/h", tarfile.LNKTYPE, "../outside")], "leaves the target"),
        ([special("modules/h", tarfile.LNKTYPE, "modules/not-there")], "not an earlier file"),
        ([special("modules/c", tarfile.CHRTYPE)], "device nodes"),
        ([special("modules/b", tarfile.BLKTYPE)], "device nodes"),
        ([special("modules/f", tarfile.FIFOTYPE)], "FIFOs"),
        ([special("vmlinux", tarfile.SYMTYPE, "config")], "must be a regular file"),
        ([special("vmlinux", tarfile.DIRTYPE)], "must be a regular file"),
        ([reg("etc-passwd", b"x")], "unexpected top-level"),
        ([reg("vmlinux", b"a"), reg("vmlinux", b"b")], "duplicate"),
        (
            [special("modules", tarfile.DIRTYPE), special("modules/l", tarfile.SYMTYPE, "."), reg("modules/l/x", b"")],
            "passes through",
        ),
    ],
)
def test_hostile_members_are_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], needle: str
) -> None:
    with pytest.raises(UnsafeArchiveError, match=needle):
        extract(tar_bytes(members), tmp_path / "k")
    assert not (tmp_path / "evil").exists()
    assert os.listdir(tmp_path) == ["k"]


def test_declared_sizes_over_limit_are_refused_before_writing(tmp_path: Path) -> None:
    data = tar_bytes([reg("vmlinux", FAKE_VMLINUX), reg("config", bytes(200_000))])
    with pytest.raises(UnsafeArchiveError, match="more than"):
        extract(data, tmp_path / "k", limit=100_000)
    assert not (tmp_path / "k" / "config").exists()


def test_stream_over_limit_is_refused(tmp_path: Path) -> None:
    data = tar_bytes([reg("vmlinux", FAKE_VMLINUX)]) + bytes(300_000)
    reader = ForwardReader(io.BytesIO(data), 100_000)
    with pytest.raises(UnsafeArchiveError, match="decompresses to more than"):
        extract_tar_stream(reader, tmp_path, limit=100_000)
        reader.drain()
    (tmp_path / "ok").mkdir()
    ok = ForwardReader(io.BytesIO(data), 400_000)
    extract_tar_stream(ok, tmp_path / "ok", limit=400_000)
    assert ok.drain() > 0


@pytest.mark.parametrize("where", ["after-last-header", "inside-data", "garbled-header"])
def test_truncated_or_garbled_tar_is_an_integrity_error(tmp_path: Path, where: str) -> None:
    data = tar_bytes(good_members())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    vmlinux = members[0]
    if where == "after-last-header":
        cut = data[: members[-1].offset + 512]  # no end-of-archive marker
    elif where == "inside-data":
        cut = data[: vmlinux.offset_data + 100]
    else:
        at = members[2].offset
        cut = data[:at] + b"\xff" * 512 + data[at + 512 :]
    with pytest.raises(IntegrityError):
        extract(cut, tmp_path / "k")


def test_unpacked_limit_has_floor_and_ratio() -> None:
    assert unpacked_limit(0) == 64 << 20
    assert unpacked_limit(100 << 20) == 800 << 20


# --- property-based: whatever the bundle says, nothing lands outside the target ---------------------------------

_component = st.sampled_from(["..", ".", "", "modules", "vmlinux", "a", "b", "config", "x"])
_path = st.lists(_component, min_size=1, max_size=5).map("/".join)
_name = st.one_of(_path, _path.map(lambda p: "/" + p), _path.map(lambda p: "./" + p))
_kind = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])
_member = st.tuples(_name, _kind, st.one_of(_path, _path.map(lambda p: "/" + p)))


def _build(spec: list[tuple[str, bytes, str]]) -> bytes:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name, kind, link in spec:
        if kind == tarfile.REGTYPE:
            members.append(reg(name, b"data"))
        else:
            members.append(special(name, kind, link))
    return tar_bytes(members)


def _inside(path: Path, root: Path) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.lists(_member, min_size=1, max_size=6))
def test_property_nothing_escapes(tmp_path_factory: pytest.TempPathFactory, spec: list[tuple[str, bytes, str]]) -> None:
    sandbox = tmp_path_factory.mktemp("sandbox")
    dest = sandbox / "target"
    (sandbox / "outside").mkdir()
    try:
        extract(_build(spec), dest)
    except BangerError:
        pass  # refusing is fine; escaping is not
    assert sorted(os.listdir(sandbox)) == ["outside", "target"]
    assert os.listdir(sandbox / "outside") == []
    for dirpath, dirs, files in os.walk(dest):
        for entry in dirs + files:
            p = Path(dirpath) / entry
            assert _inside(p, dest), f"{p} resolves outside the target"
            if p.is_symlink():
                assert not os.readlink(p).startswith("/")


@given(name=_name)
def test_property_accepted_names_stay_inside(name: str) -> None:
    try:
        norm = normalize_member_name(name)
    except UnsafeArchiveError:
        assert name.startswith("/") or ".." in name.split("/")
        return
    assert not norm.startswith("/")
    assert norm == "." or ".." not in norm.split("/")


@given(name=_path, target=st.one_of(_path, _path.map(lambda p: "/" + p)))
def test_property_accepted_symlinks_resolve_inside(name: str, target: str) -> None:
    try:
        norm = normalize_member_name(name)
        check_symlink_target(norm, target)
    except UnsafeArchiveError:
        return
    resolved = os.path.normpath(os.path.join("/root", os.path.dirname(norm), target))
    assert resolved == "/root" or resolved.startswith("/root/")


def test_hard_link_spelled_through_a_symlink_links_the_checked_path(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"outside")  # what the raw spelling would reach from k/
    members = [
        reg("vmlinux", FAKE_VMLINUX),
        special("modules", tarfile.DIRTYPE),
        special("modules/up", tarfile.SYMTYPE, ".."),
        special("modules/h", tarfile.LNKTYPE, "modules/up/../../vmlinux"),
    ]
    extract(tar_bytes(members), tmp_path / "k")
    k = tmp_path / "k"
    assert os.stat(k / "modules/h").st_ino == os.stat(k / "vmlinux").st_ino
    assert os.stat(tmp_path / "vmlinux").st_nlink == 1
