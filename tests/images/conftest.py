"""Shared image fixtures: a real Debian image built once and cached across sessions by the inputs that made it.

`debian_image` yields the path of a bookworm image built by banger.images.build (cached under
/var/cache/banger-tests/images/<key>/image.ext4). Treat it as read-only: VM tests must copy it (cp --sparse=always
or reflink) before booting from it read-write.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import pytest

from banger.images.build import build_image, cache_key, cached_rootfs, plan_for, prune_cache
from banger.images.spec import ImageSpec
from banger.progress import no_progress

CACHE_ROOT = Path("/var/cache/banger-tests/images")
ROOTFS_CACHE = CACHE_ROOT / "cache"
DEBIAN_SPEC = ImageSpec(name="test-debian")
STALE_AFTER = 3600.0


def _code_hash() -> str:
    """Hash of banger.images' own sources, so a code change rebuilds the cached test image."""
    h = hashlib.sha256()
    pkg = resources.files("banger.images")
    for name in sorted(p.name for p in pkg.iterdir() if p.name.endswith(".py")):
        h.update(name.encode() + pkg.joinpath(name).read_bytes())
    h.update(pkg.joinpath("files/banger-init").read_bytes())
    return h.hexdigest()[:16]


@contextmanager
def _cache_lock() -> Iterator[None]:
    # Several test sessions (helpers, CI jobs) may share the cache; building twice at once wastes minutes.
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with (CACHE_ROOT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def image_cache_dir() -> Path:
    """The bootstrap cache the tests share (rootfs tarballs keyed by their inputs)."""
    return ROOTFS_CACHE


@pytest.fixture(scope="session")
def debian_rootfs_tar(debian_image: Path) -> Path:
    """The cached, real bootstrapped Debian rootfs tarball behind `debian_image`."""
    return cached_rootfs(ROOTFS_CACHE, cache_key(plan_for(DEBIAN_SPEC)))


@pytest.fixture(scope="session")
def debian_image() -> Iterator[Path]:
    """A real Debian bookworm banger image (built once, then reused while its inputs and code are unchanged)."""
    rootfs_key = cache_key(plan_for(DEBIAN_SPEC))
    image = CACHE_ROOT / f"{rootfs_key}-{_code_hash()}" / "image.ext4"
    with _cache_lock():
        # Images built by other code or for old inputs are dead weight (~200 MB each), but a concurrent session
        # running other code may still be copying one: only remove those unused for a while.
        for stale in CACHE_ROOT.glob("*-*"):
            if stale.is_dir() and stale != image.parent and time.time() - stale.stat().st_mtime > STALE_AFTER:
                shutil.rmtree(stale)
        tar = cached_rootfs(ROOTFS_CACHE, rootfs_key)
        if tar.with_suffix(".json").exists():
            os.utime(tar.with_suffix(".json"))  # most recently used, so the prune below keeps it
        prune_cache(ROOTFS_CACHE, keep=2)
        if not (image.is_file() and tar.is_file()):
            image.unlink(missing_ok=True)
            build_image(DEBIAN_SPEC, image, cache_dir=ROOTFS_CACHE, progress=no_progress)
        os.utime(image.parent)  # marks it as in use for other sessions' pruning
    yield image
