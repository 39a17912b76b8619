"""`image import` from real rootfs trees: the cached Debian rootfs as .tar.zst, as a directory, without python3."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from banger.errors import InvalidInputError
from banger.images.build import cached_tree
from banger.images.guestside import stub_bytes
from banger.images.importer import import_rootfs
from banger.images.spec import BuildStep, MiB
from banger.progress import ProgressEvent, no_progress

from .debugfs import cat, debugfs, exists, fsck_clean


@pytest.fixture(scope="module")
def rootfs_dir(debian_rootfs_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real Debian rootfs: a hard-linked copy of the build cache's extracted tree (files must not be edited)."""
    root = tmp_path_factory.mktemp("rootfs") / "root"
    subprocess.run(["cp", "-al", str(cached_tree(debian_rootfs_tar)), str(root)], check=True)
    yield root
    shutil.rmtree(root)


def _assert_banger_image(image: Path, source: str) -> None:
    assert cat(image, "/sbin/banger-init") == stub_bytes()
    meta = json.loads(cat(image, "/etc/banger/image.json"))
    assert meta["source"] == source and meta["preset"] is None
    assert cat(image, "/etc/resolv.conf") == b""
    assert exists(image, "/usr/bin/python3")
    assert fsck_clean(image)


def test_import_zstd_tar(debian_rootfs_tar: Path, tmp_path: Path) -> None:
    # The shape of `docker export | zstd`: a plain tar stream compressed with zstd.
    src = tmp_path / "rootfs.tar.zst"
    with debian_rootfs_tar.open("rb") as fin, src.open("wb") as fout:
        zstandard.ZstdCompressor(level=1).copy_stream(fin, fout)
    events: list[ProgressEvent] = []
    out = tmp_path / "images" / "imported.ext4"
    info = import_rootfs(src, out, progress=events.append, size_bytes=1024 * MiB)
    assert info.size_bytes == 1024 * MiB == out.stat().st_size
    assert info.name == "imported" and info.missing_optional == []
    assert [str(e.step) for e in events].count(BuildStep.MKFS) == 2
    _assert_banger_image(out, f"import:{src}")
    # The rootfs's own device nodes were skipped; guestside made the two the kernel needs.
    listing = debugfs(out, "ls /dev")
    assert "console" in listing and "null" in listing and "urandom" not in listing
    assert list((tmp_path / "images").iterdir()) == [out]


def test_import_directory_leaves_source_untouched(rootfs_dir: Path, tmp_path: Path) -> None:
    resolv_before = (rootfs_dir / "etc/resolv.conf").read_bytes()
    out = tmp_path / "dir.ext4"
    info = import_rootfs(rootfs_dir, out, progress=no_progress, name="from-dir")
    assert info.name == "from-dir"
    _assert_banger_image(out, f"import:{rootfs_dir}")
    assert not (rootfs_dir / "usr/sbin/banger-init").exists()
    assert (rootfs_dir / "etc/resolv.conf").read_bytes() == resolv_before


def test_import_without_python3_is_a_clear_error(rootfs_dir: Path, tmp_path: Path) -> None:
    # A hard-linked copy of the real rootfs minus python3: cheap, and the original stays intact.
    nopy = tmp_path / "nopy"
    subprocess.run(["cp", "-al", str(rootfs_dir), str(nopy)], check=True)
    for p in (nopy / "usr/bin").glob("python3*"):
        p.unlink()
    tar = tmp_path / "nopy.tar.gz"
    with tarfile.open(tar, "w:gz", compresslevel=1) as tf:
        # Just enough for the earlier checks (/bin/sh, mount) to pass, so the python3 check is what fails.
        for rel in ("bin", "sbin", "lib", "usr/bin", "etc"):
            tf.add(nopy / rel, arcname=rel)
    outdir = tmp_path / "images"
    for src in (nopy, tar):
        with pytest.raises(InvalidInputError, match="rootfs lacks python3") as exc:
            import_rootfs(src, outdir / "nopy.ext4", progress=no_progress)
        assert exc.value.hint and "python3" in exc.value.hint
        assert not outdir.exists() or list(outdir.iterdir()) == []


def test_import_rejects_non_tar_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tarball at all" * 50)
    with pytest.raises(InvalidInputError, match="neither a directory nor a tar"):
        import_rootfs(junk, tmp_path / "x.ext4", progress=no_progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.tar"]
