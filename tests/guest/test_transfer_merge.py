"""extract_tar onto existing destinations: merge like `cp -r`, replace each file by rename, delete nothing."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from banger.guest.transfer import TransferError, extract_tar, write_tar


def tar_of(path: Path) -> io.BytesIO:
    """The transfer tar of `path`, as the sending side makes it."""
    buf = io.BytesIO()

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
            return buf.write(b)

    write_tar(path, Sink())
    buf.seek(0)
    return buf


def extract(src: Path, target: Path) -> None:
    extract_tar(tar_of(src), target, keep_owner=False)  # type: ignore[arg-type]


def test_directory_onto_existing_directory_merges(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_text("new a")
    (src / "sub" / "b").write_text("new b")
    (dest / "sub").mkdir(parents=True)
    (dest / "a").write_text("old a")
    (dest / "keep").write_text("only in dest")
    (dest / "sub" / "keep2").write_text("only in dest/sub")
    (dest / "sub").chmod(0o711)
    extract(src, dest)
    assert (dest / "a").read_text() == "new a"
    assert (dest / "sub" / "b").read_text() == "new b"
    assert (dest / "keep").read_text() == "only in dest"
    assert (dest / "sub" / "keep2").read_text() == "only in dest/sub"
    assert (dest / "sub").stat().st_mode & 0o777 == 0o711, "an existing directory keeps its own mode"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"], "no staging directory left"


def test_each_file_is_replaced_atomically(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "f").write_bytes(b"new" * 1000)
    (dest / "f").write_bytes(b"old")
    before = (dest / "f").stat().st_ino
    with (dest / "f").open("rb") as reader:
        extract(src, dest)
        # Replaced by rename, not rewritten in place: a reader of the old file still sees all of the old one.
        assert reader.read() == b"old"
    assert (dest / "f").stat().st_ino != before
    assert (dest / "f").read_bytes() == b"new" * 1000


def test_type_conflicts_are_refused_before_anything_moves(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "x").mkdir(parents=True)
    (src / "a").write_text("new a")
    (src / "x" / "inner").write_text("inner")
    dest.mkdir()
    (dest / "a").write_text("old a")
    (dest / "x").write_text("a file where the source has a directory")
    with pytest.raises(TransferError, match="non-directory"):
        extract(src, dest)
    assert (dest / "a").read_text() == "old a", "nothing was merged before the conflict was found"
    assert (dest / "x").read_text() == "a file where the source has a directory"
    # And a file onto a directory: the directory (and what it holds) stays.
    (tmp_path / "onefile").write_text("one")
    (tmp_path / "d" / "onefile").mkdir(parents=True)
    (tmp_path / "d" / "onefile" / "precious").write_text("keep me")
    with pytest.raises(TransferError, match="cannot overwrite directory"):
        extract(tmp_path / "onefile", tmp_path / "d" / "onefile")
    assert (tmp_path / "d" / "onefile" / "precious").read_text() == "keep me"


def test_symlinks_in_the_destination_are_not_followed(tmp_path: Path) -> None:
    src, dest, outside = tmp_path / "src", tmp_path / "dest", tmp_path / "outside"
    (src / "l").mkdir(parents=True)
    (src / "l" / "f").write_text("x")
    (src / "g").write_text("new g")
    outside.mkdir()
    (outside / "g").write_text("outside g")
    dest.mkdir()
    (dest / "l").symlink_to(outside)
    with pytest.raises(TransferError, match="non-directory"):
        extract(src, dest)
    assert not (outside / "f").exists()
    (dest / "l").unlink()
    (dest / "g").symlink_to(outside / "g")
    (src / "l" / "f").unlink()
    (src / "l").rmdir()
    extract(src, dest)
    assert (outside / "g").read_text() == "outside g", "a file replaces the symlink, not what it points to"
    assert not (dest / "g").is_symlink() and (dest / "g").read_text() == "new g"


def test_new_destination_and_single_file(tmp_path: Path) -> None:
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / "f").write_text("f")
    extract(tmp_path / "src", tmp_path / "new" / "place")
    assert (tmp_path / "new" / "place" / "d" / "f").read_text() == "f"
    (tmp_path / "file").write_text("v2")
    (tmp_path / "existing").write_text("v1")
    extract(tmp_path / "file", tmp_path / "existing")
    assert (tmp_path / "existing").read_text() == "v2"


def test_merge_across_a_mount_point(tmp_path: Path) -> None:
    """A destination subdirectory on another filesystem: rename(2) cannot cross it, the copy lands all the same."""
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a tmpfs")
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "m").mkdir(parents=True)
    (src / "m" / "f").write_text("across")
    (src / "m" / "d").mkdir()
    (src / "m" / "d" / "g").write_text("dir across")
    (dest / "m").mkdir(parents=True)

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dest / "m")], check=True, timeout=30)
    try:
        (dest / "m" / "f").write_text("old")
        (dest / "m" / "keep").write_text("kept")
        extract(src, dest)
        assert (dest / "m" / "f").read_text() == "across"
        assert (dest / "m" / "d" / "g").read_text() == "dir across"
        assert (dest / "m" / "keep").read_text() == "kept"
        assert sorted(p.name for p in (dest / "m").iterdir()) == ["d", "f", "keep"]
    finally:
        # Wherever the mount ended up (a broken merge could move it), it must not outlive the test.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for where in sorted((m for m in mounts if m.startswith(str(tmp_path))), reverse=True):
            subprocess.run(["umount", where], check=True, timeout=30)
