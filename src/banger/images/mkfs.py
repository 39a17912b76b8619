"""Turning a staged rootfs directory into a sparse ext4 image with `mkfs.ext4 -d` (no mounts, no loop devices)."""

from __future__ import annotations

import os
from pathlib import Path

from banger import proc
from banger.errors import InvalidInputError
from banger.images.spec import DEFAULT_SIZE, BuildStep, MiB
from banger.progress import Progress, ProgressEvent

ROOT_LABEL = "BANGERROOT"
BLOCK = 4096
# Journal, inode tables, group descriptors and reserved GDT blocks on top of file data, plus room to breathe.
_OVERHEAD_FIXED = 96 * MiB
_OVERHEAD_RATIO = 1.15
_GROW_STEP = 256 * MiB


def rootfs_usage(root: Path) -> tuple[int, int]:
    """(bytes the rootfs occupies in 4 KiB blocks, number of inodes) — what an ext4 image must hold."""
    used = 0
    inodes = 0
    for dirpath, dirs, files in os.walk(root):
        inodes += len(dirs) + len(files)
        used += BLOCK * len(dirs)
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            used += -(-st.st_size // BLOCK) * BLOCK
    return used, inodes


def needed_size(root: Path) -> int:
    """A safe lower bound for the image size holding `root`, in whole MiB."""
    used, inodes = rootfs_usage(root)
    need = int(used * _OVERHEAD_RATIO) + inodes * 256 + _OVERHEAD_FIXED
    return -(-need // MiB) * MiB


def choose_size(root: Path, requested: int | None) -> int:
    """The image size: `requested` if it fits (else a clear error), or DEFAULT_SIZE grown in 256 MiB steps."""
    need = needed_size(root)
    if requested is not None:
        if requested < need:
            raise InvalidInputError(
                f"image size {requested // MiB}M is too small for this rootfs (needs about {need // MiB}M)"
            )
        return requested
    if need <= DEFAULT_SIZE:
        return DEFAULT_SIZE
    return -(-need // _GROW_STEP) * _GROW_STEP


def make_ext4(root: Path, image: Path, size_bytes: int, *, progress: Progress, label: str = ROOT_LABEL) -> None:
    """Create the sparse ext4 file `image` of `size_bytes` holding a copy of the directory `root`."""
    progress(ProgressEvent(step=BuildStep.MKFS, done=0, total=size_bytes))
    # A fresh sparse file reads back as zeros, so lazy init leaves nothing stale and keeps the image sparse.
    with image.open("xb") as f:
        f.truncate(size_bytes)
    proc.run(
        [
            proc.which("mkfs.ext4", hint="install e2fsprogs"),
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            str(BLOCK),
            "-m",
            "0",
            "-L",
            label,
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
            "-d",
            str(root),
            str(image),
            f"{size_bytes // 1024}k",
        ],
        step=BuildStep.MKFS,
        timeout=3600,
    )
    progress(ProgressEvent(step=BuildStep.MKFS, done=size_bytes, total=size_bytes))
