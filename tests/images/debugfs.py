"""Reading ext4 images without mounting them: debugfs and e2fsck in read-only modes."""

from __future__ import annotations

import subprocess
from pathlib import Path


def debugfs(image: Path, request: str) -> str:
    """Run one read-only debugfs request against `image` and return its output."""
    out = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, check=True)
    return out.stdout.decode(errors="replace")


def cat(image: Path, path: str) -> bytes:
    """The bytes of `path` inside `image`."""
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout


def exists(image: Path, path: str) -> bool:
    """True when `path` exists inside `image`."""
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, check=True)
    return b"File not found" not in out.stderr and b"Inode:" in out.stdout


def fsck_clean(image: Path) -> bool:
    """True when a forced, read-only e2fsck finds nothing to fix."""
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0
