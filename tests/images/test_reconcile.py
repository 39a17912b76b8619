"""A daemon killed while it produced an image leaves nothing the next start does not clean up (found by the chaos
suite: an import killed between the file's rename and its record left a file no record named)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from banger.config import DEFAULTS, Paths, Settings
from banger.images.service import ImageService
from banger.images.spec import ImageInfo
from banger.store.db import Store


def _info(name: str) -> ImageInfo:
    return ImageInfo(
        name=name,
        source="test",
        preset=None,
        suite=None,
        mirror=None,
        packages=[],
        arch="x86_64",
        size_bytes=4096,
        rootfs_bytes=0,
        banger_version="test",
    )


def _service(tmp_path: Path) -> ImageService:
    store = Store(tmp_path / "b.db")
    store.migrate()
    return ImageService(Settings(paths=Paths(tmp_path / "home"), values=dict(DEFAULTS)), store)


def test_a_produced_image_is_recorded_before_its_file_appears(tmp_path: Path) -> None:
    images = _service(tmp_path)
    images.root.mkdir(parents=True)
    seen: dict[str, bool] = {}

    def make(out: Path, cancel: threading.Event) -> ImageInfo:
        out.write_bytes(b"\0" * 4096)
        return _info("fresh")

    real_record = images._record

    def record(info: ImageInfo) -> object:
        seen["file_there_when_recorded"] = images.path_of("fresh").exists()
        return real_record(info)

    images._record = record  # type: ignore[method-assign]  # observes the order; the real method still runs
    asyncio.run(images._produce("fresh", False, make))
    assert seen == {"file_there_when_recorded": False}
    assert images.path_of("fresh").exists() and images.store.one("SELECT 1 FROM images WHERE name='fresh'")


def test_reconcile_drops_a_record_without_its_file_and_removes_staged_files(tmp_path: Path) -> None:
    images = _service(tmp_path)
    images.root.mkdir(parents=True)
    # What a daemon killed between the record and the rename leaves: the record, and the staged file.
    images._record(_info("cut"))
    staged = images.root / "cut.ext4.new"
    staged.write_bytes(b"\0" * 4096)
    keep = images.root / "other.img"  # not banger's naming: left alone
    keep.write_bytes(b"x")
    images.reconcile()
    assert images.store.one("SELECT 1 FROM images WHERE name='cut'") is None
    assert not staged.exists() and keep.exists()
