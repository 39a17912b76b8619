"""Root disk clones: a filesystem e2fsck cannot repair is refused, never grown by resize2fs -f regardless."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.errors import ToolError
from banger.vms.disk import clone_root_disk

MIB = 1 << 20


def make_image(path: Path) -> Path:
    with path.open("wb") as f:
        f.truncate(8 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, timeout=60)
    return path


def test_clone_grows_a_sound_filesystem(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img.ext4")
    clone_root_disk(image, tmp_path / "root.ext4", 16 * MIB)
    assert (tmp_path / "root.ext4").stat().st_size == 16 * MIB
    check = subprocess.run(["e2fsck", "-f", "-n", str(tmp_path / "root.ext4")], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout


def test_clone_refuses_a_filesystem_e2fsck_cannot_fix(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img.ext4")
    with image.open("r+b") as f:  # the primary superblock: e2fsck -p gives up (it needs a human)
        f.seek(1024)
        f.write(b"\xff" * 1024)
    with pytest.raises(ToolError, match="e2fsck found errors it could not fix"):
        clone_root_disk(image, tmp_path / "root.ext4", 16 * MIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.ext4"], "nothing half-written is left"
