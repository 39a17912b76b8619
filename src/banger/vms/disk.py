"""Per-VM root disks: a copy-on-write clone of the image (reflink where possible, sparse copy otherwise)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from banger import proc
from banger.errors import InvalidInputError, ToolError

# Bound on each tool that copies, checks or grows a root disk (they scale with its size).
DISK_TIMEOUT = 1800.0
# e2fsck's exit status is a bit mask: 1 = errors fixed, 2 = fixed and a reboot advised (moot for an image file).
# Anything else (4 uncorrected, 8 operational error, ...) means the filesystem must not be resized.
_FSCK_FIXED = frozenset({0, 1, 2})


def check_filesystem(image: Path) -> None:
    """Check (and repair what can be repaired automatically) the ext4 filesystem in `image`; resize2fs needs it.

    A filesystem e2fsck could not repair is refused with e2fsck's own words, rather than grown regardless.
    """
    done = proc.run(["e2fsck", "-f", "-p", str(image)], step="check root disk", check=False, timeout=DISK_TIMEOUT)
    if done.returncode not in _FSCK_FIXED:
        tail = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()[-3:]
        raise ToolError(
            f"check root disk: e2fsck found errors it could not fix (exit {done.returncode}): "
            + (" | ".join(tail) or "(no output)"),
            hint="the image may be damaged; rebuild or re-import it",
        )


def clone_root_disk(image: Path, dest: Path, size_bytes: int) -> None:
    """Clone `image` to `dest` and grow its ext4 filesystem to `size_bytes`; nothing is left on failure."""
    current = image.stat().st_size
    if size_bytes < current:
        raise InvalidInputError(
            f"disk size {size_bytes} is smaller than the image ({current} bytes); ext4 images are not shrunk"
        )
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        # --reflink=auto shares blocks on btrfs/xfs; elsewhere --sparse=always keeps the copy thin.
        proc.run(
            ["cp", "--reflink=auto", "--sparse=always", str(image), str(tmp)], step="clone image", timeout=DISK_TIMEOUT
        )
        if size_bytes > current:
            os.truncate(tmp, size_bytes)
            check_filesystem(tmp)
            proc.run(["resize2fs", "-f", str(tmp)], step="grow root disk", timeout=DISK_TIMEOUT)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
