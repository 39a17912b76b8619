"""Per-VM root disks: a copy-on-write clone of the image (reflink where possible, sparse copy otherwise)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from banger import proc
from banger.errors import InvalidInputError


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
        proc.run(["cp", "--reflink=auto", "--sparse=always", str(image), str(tmp)], step="clone image")
        if size_bytes > current:
            os.truncate(tmp, size_bytes)
            # resize2fs insists on a freshly checked filesystem; e2fsck -p exits 1 when it fixed something.
            proc.run(["e2fsck", "-f", "-p", str(tmp)], step="check root disk", check=False)
            proc.run(["resize2fs", "-f", str(tmp)], step="grow root disk")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
