"""Derived images: keys, names, and plain files written into a real ext4 image (no mounts)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from banger.errors import InvalidInputError, UnsupportedError
from banger.images.derived import (
    DerivedFile,
    DerivedSpec,
    build_derived,
    check_spec,
    derived_key,
    derived_name,
    image_has,
)
from banger.images.spec import ImageInfo
from banger.progress import no_progress
from tests.images.debugfs import cat, debugfs, fsck_clean

BASE = ImageInfo(
    name="base",
    source="preset:debian",
    preset="debian",
    suite="bookworm",
    mirror=None,
    packages=["python3"],
    arch="x86_64",
    size_bytes=0,
    rootfs_bytes=0,
    banger_version="x",
    cache_key="k",
    built_at="t",
)


def test_key_covers_packages_files_and_base(tmp_path: Path) -> None:
    f = tmp_path / "agent"
    f.write_bytes(b"v1")
    spec = DerivedSpec("base", ("git",), (DerivedFile(f, "/usr/local/bin/agent"),), label="agent")
    key = derived_key(spec, BASE)
    assert derived_key(spec, BASE) == key
    assert derived_key(dataclasses.replace(spec, packages=("git", "make")), BASE) != key
    assert derived_key(spec, dataclasses.replace(BASE, built_at="t2")) != key
    f.write_bytes(b"v2")
    assert derived_key(spec, BASE) != key
    assert derived_name(spec, key) == f"agent-{key}"
    assert derived_name(DerivedSpec("Weird_Name"), key) == f"weird-name-{key}"


def test_bad_file_entries_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"x")
    for guest in ("relative/path", "/a/../b", "/a b"):
        with pytest.raises(InvalidInputError):
            check_spec(DerivedSpec("base", files=(DerivedFile(f, guest),)))
    with pytest.raises(InvalidInputError, match="not a file"):
        check_spec(DerivedSpec("base", files=(DerivedFile(tmp_path / "missing", "/x"),)))


def test_packages_need_a_debian_preset_image(tmp_path: Path) -> None:
    other = dataclasses.replace(BASE, preset=None, source="import:x")
    with pytest.raises(UnsupportedError, match="not built by the Debian preset"):
        build_derived(
            DerivedSpec("base", ("git",)),
            "n",
            "k",
            other,
            tmp_path / "b",
            tmp_path / "o",
            cache_dir=tmp_path,
            progress=no_progress,
        )


def test_files_land_in_a_real_image(debian_image: Path, tmp_path: Path) -> None:
    big = tmp_path / "agent-bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    conf = tmp_path / "agent.conf"
    conf.write_text("x=1\n")
    spec = DerivedSpec(
        "base",
        files=(DerivedFile(big, "/opt/agent/bin/agent"), DerivedFile(conf, "/etc/agent.conf", 0o640)),
    )
    base_copy = tmp_path / "base.ext4"
    shutil.copyfile(debian_image, base_copy)
    out = tmp_path / "derived.ext4"
    info = build_derived(spec, "agent-1", "k1", BASE, base_copy, out, cache_dir=tmp_path, progress=no_progress)
    assert info.name == "agent-1" and info.source == "derived:base" and info.cache_key == "k1"
    assert cat(out, "/opt/agent/bin/agent") == big.read_bytes()
    assert cat(out, "/etc/agent.conf") == b"x=1\n"
    stat = debugfs(out, "stat /etc/agent.conf")
    assert "Mode:  0640" in stat and "User:     0" in stat
    assert image_has(out, "/opt/agent/bin/agent") and not image_has(debian_image, "/opt/agent/bin/agent")
    assert fsck_clean(out)


def test_workspace_images_get_git_when_they_lack_it() -> None:
    from banger.daemon.methods.workspace_area import packages_to_add

    old = dataclasses.replace(BASE, packages=["python3"])  # a Debian image built before the preset had git
    assert packages_to_add(old, [], has_git=False) == ["git"]
    assert packages_to_add(old, ["make", "git", "make"], has_git=True) == ["git", "make"]
    imported = dataclasses.replace(BASE, preset=None, source="import:alpine.tar")
    with pytest.raises(UnsupportedError, match="has no git and was not built by the Debian preset"):
        packages_to_add(imported, [], has_git=False)
    assert packages_to_add(imported, [], has_git=True) == []
