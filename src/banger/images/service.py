"""The image service: the daemon's view of root filesystem images (store rows + files under images/)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from banger.aio import in_thread_cancellable
from banger.config import Settings
from banger.errors import AlreadyExistsError, BusyError, InUseError, NotFoundError
from banger.fsutil import human_size
from banger.images.build import build_image
from banger.images.derived import DerivedSpec, build_derived, check_spec, derived_key, derived_name
from banger.images.importer import import_rootfs
from banger.images.presets import Preset
from banger.images.spec import ImageInfo, ImageSpec, parse_size
from banger.names import validate_name
from banger.progress import Progress, ProgressEvent, no_progress
from banger.store.db import Store

log = logging.getLogger("banger.images")


class ImageService:
    """Images live as `<home>/images/<name>.ext4`; the store keeps their ImageInfo."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.root = settings.paths.images
        self._busy: set[str] = set()
        self._derive_locks: dict[str, asyncio.Lock] = {}

    def path_of(self, name: str) -> Path:
        return self.root / f"{name}.ext4"

    def _row_json(self, info: ImageInfo, path: str) -> dict[str, Any]:
        return {**info.to_json(), "path": path, "size": human_size(info.size_bytes)}

    def _record(self, info: ImageInfo) -> dict[str, Any]:
        path = self.path_of(info.name)
        self.store.execute(
            "INSERT INTO images (name, source, path, size_bytes, created_at, info) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET source=excluded.source, path=excluded.path, "
            "size_bytes=excluded.size_bytes, created_at=excluded.created_at, info=excluded.info",
            (info.name, info.source, str(path), info.size_bytes, info.built_at, json.dumps(info.to_json())),
        )
        return self._row_json(info, str(path))

    def all(self) -> list[dict[str, Any]]:
        """Images, by name."""
        rows = self.store.query("SELECT info, path FROM images ORDER BY name")
        return [self._row_json(ImageInfo.from_json(json.loads(r["info"])), r["path"]) for r in rows]

    def get(self, name: str) -> dict[str, Any]:
        """One image, or NotFoundError listing what exists."""
        row = self.store.one("SELECT info, path FROM images WHERE name=?", (name,))
        if row is None:
            known = [r["name"] for r in self.store.query("SELECT name FROM images ORDER BY name")]
            raise NotFoundError(
                f"image {name!r} does not exist (images: {', '.join(known) or 'none'})",
                hint="build one with `banger image build NAME --preset debian`",
            )
        data = self._row_json(ImageInfo.from_json(json.loads(row["info"])), row["path"])
        data["used_by"] = [r["name"] for r in self.store.query("SELECT name FROM vms WHERE image=?", (name,))]
        return data

    def info_of(self, name: str) -> ImageInfo:
        """The typed record of image `name` (NotFoundError when it does not exist)."""
        self.get(name)
        row = self.store.one("SELECT info FROM images WHERE name=?", (name,))
        assert row is not None
        return ImageInfo.from_json(json.loads(row["info"]))

    async def ensure_derived(self, spec: DerivedSpec, progress: Progress = no_progress) -> str:
        """The name of the cached derived image for `spec`, built first when missing (see images/derived.py)."""
        base = self.info_of(spec.base_image)
        check_spec(spec)
        key = await asyncio.to_thread(derived_key, spec, base)
        name = derived_name(spec, key)
        async with self._derive_locks.setdefault(name, asyncio.Lock()):
            if self.store.one("SELECT 1 FROM images WHERE name=?", (name,)) and self.path_of(name).exists():
                log.info("derived image %s: reusing the cached image (no install)", name)
                progress(ProgressEvent(step="derive", message=f"reusing cached image {name}"))
                return name
            cache = self.settings.paths.cache / "images"
            base_path = self.path_of(base.name)
            with self._claim(name, force=True):

                def make(out: Path, cancel: threading.Event) -> ImageInfo:
                    return build_derived(
                        spec, name, key, base, base_path, out, cache_dir=cache, progress=progress, cancel=cancel
                    )

                await self._produce(name, True, make)
            log.info("derived image %s: built from %s", name, base.name)
            return name

    def reconcile(self) -> None:
        """Drop records whose file vanished (unless a VM still names them), and the staged files of builds and
        imports a killed daemon left (`<name>.ext4.new`: never a finished image, see `_produce`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for staged in self.root.glob("*.ext4.new"):
            with contextlib.suppress(OSError):
                staged.unlink()
                log.warning("images: removed %s (a build or import cut short)", staged.name)
        for row in self.store.query("SELECT name, path FROM images"):
            if not Path(row["path"]).exists() and not self.store.one("SELECT 1 FROM vms WHERE image=?", (row["name"],)):
                self.store.execute("DELETE FROM images WHERE name=?", (row["name"],))
                log.warning("images: dropped record of %s (its file is gone)", row["name"])

    @contextlib.contextmanager
    def _claim(self, name: str, force: bool):  # type: ignore[no-untyped-def]
        """One build/import per name at a time; refuses to overwrite unless forced."""
        validate_name(name, "image name")
        if name in self._busy:
            raise BusyError(f"image {name!r} is being built or imported already")
        exists = self.store.one("SELECT 1 FROM images WHERE name=?", (name,)) is not None
        if exists and not force:
            raise AlreadyExistsError(f"image {name!r} already exists", hint="use --force to rebuild it")
        if exists:
            self._check_unused(name)
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

    def _check_unused(self, name: str) -> None:
        users = [r["name"] for r in self.store.query("SELECT name FROM vms WHERE image=?", (name,))]
        if users:
            raise InUseError(f"image {name!r} is used by VM(s) {', '.join(users)}", hint="remove those VMs first")

    async def _produce(self, name: str, force: bool, make: Any) -> dict[str, Any]:
        """Build into `<name>.ext4.new`, then swap it in, so a forced rebuild never leaves a half image."""
        final = self.path_of(name)
        staged = final.with_name(final.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        existed = self.store.one("SELECT 1 FROM images WHERE name=?", (name,)) is not None
        try:
            info: ImageInfo = await in_thread_cancellable(lambda cancel: make(staged, cancel))
            # The record first, then the file: a daemon killed in between leaves a record without its file,
            # which the next start drops (`reconcile`), never a file that no record names.
            record = self._record(info)
            try:
                staged.replace(final)
            except BaseException:
                if not existed:
                    self.store.execute("DELETE FROM images WHERE name=?", (name,))
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        return record

    async def build(
        self,
        name: str,
        *,
        preset: str,
        suite: str | None,
        mirror: str | None,
        packages: list[str],
        size: str | None,
        force: bool,
        progress: Progress = no_progress,
    ) -> dict[str, Any]:
        """Build an image from a preset (debian, alpine, void)."""
        with self._claim(name, force):
            try:
                preset_kind = Preset(preset)
            except ValueError:
                raise NotFoundError(
                    f"unknown preset {preset!r} (presets: {', '.join(p.value for p in Preset)})"
                ) from None
            spec = ImageSpec(
                name=name,
                preset=preset_kind,
                suite=suite,
                mirror=mirror,
                packages=tuple(packages),
                size_bytes=parse_size(size) if size else None,
            )
            cache = self.settings.paths.cache / "images"

            def make(out: Path, cancel: threading.Event) -> ImageInfo:
                return build_image(spec, out, cache_dir=cache, progress=progress, cancel=cancel)

            return await self._produce(name, force, make)

    async def import_(
        self, name: str, source: str, *, size: str | None, force: bool, progress: Progress = no_progress
    ) -> dict[str, Any]:
        """Turn a rootfs tarball or directory into an image with banger's guest side."""
        with self._claim(name, force):
            size_bytes = parse_size(size) if size else None

            def make(out: Path, cancel: threading.Event) -> ImageInfo:
                return import_rootfs(
                    Path(source), out, progress=progress, name=name, size_bytes=size_bytes, cancel=cancel
                )

            return await self._produce(name, force, make)

    async def remove(self, name: str) -> None:
        """Delete an image; refused while a VM uses it."""
        info = self.get(name)
        if name in self._busy:
            raise BusyError(f"image {name!r} is being built or imported")
        # Check and delete the record in one transaction: from then on no VM can be created from it.
        with self.store.transaction() as conn:
            users = [r["name"] for r in conn.execute("SELECT name FROM vms WHERE image=?", (name,))]
            if users:
                raise InUseError(f"image {name!r} is used by VM(s) {', '.join(users)}", hint="remove those VMs first")
            conn.execute("DELETE FROM images WHERE name=?", (name,))
        await asyncio.shield(asyncio.to_thread(Path(info["path"]).unlink, missing_ok=True))
