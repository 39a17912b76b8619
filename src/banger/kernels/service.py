"""The kernel service: the daemon's view of installed kernels (store rows + directories) and the catalog."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

from banger import proc
from banger.aio import in_thread, in_thread_cancellable
from banger.config import Settings, read_config_file
from banger.errors import (
    AlreadyExistsError,
    BangerError,
    CancelledError,
    InUseError,
    InvalidInputError,
    NotFoundError,
)
from banger.fsutil import human_size, temp_sibling_dir
from banger.kernels import debian
from banger.kernels.catalog import Catalog, load_catalog
from banger.kernels.localops import (
    import_kernel,
    install_dir,
    kernel_lock,
    remove_kernel_dir,
    sweep_leftovers,
    write_bundle,
)
from banger.kernels.manifest import KernelManifest, read_manifest
from banger.kernels.pull import pull_kernel
from banger.names import validate_name
from banger.progress import Progress, ProgressEvent, no_progress
from banger.store.db import Store

log = logging.getLogger("banger.kernels")


class KernelService:
    """Installed kernels live in `<home>/kernels/<name>/`; the store mirrors their manifests."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.root = settings.paths.kernels

    # -- records ---------------------------------------------------------------------------------------------

    def _record(self, manifest: KernelManifest) -> dict[str, Any]:
        path = self.root / manifest.name
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO kernels (name, distro, arch, kernel_version, sha256, source, size_bytes, path, "
                "created_at, manifest) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "distro=excluded.distro, arch=excluded.arch, kernel_version=excluded.kernel_version, "
                "sha256=excluded.sha256, source=excluded.source, size_bytes=excluded.size_bytes, "
                "path=excluded.path, created_at=excluded.created_at, manifest=excluded.manifest",
                (
                    manifest.name,
                    manifest.distro,
                    manifest.arch,
                    manifest.kernel_version,
                    manifest.sha256,
                    manifest.source,
                    manifest.size_bytes,
                    str(path),
                    manifest.created_at,
                    json.dumps(manifest.to_json()),
                ),
            )
        return self._row_json(manifest, path)

    @staticmethod
    def _row_json(manifest: KernelManifest, path: Path) -> dict[str, Any]:
        return {**manifest.to_json(), "path": str(path), "size": human_size(manifest.size_bytes)}

    def sync(self, name: str) -> None:
        """Make the record of `name` agree with its directory (after an operation that may have been cut short)."""
        kdir = self.root / name
        if (kdir / "manifest.json").is_file():
            try:
                manifest = read_manifest(kdir)
            except BangerError as exc:
                log.warning("kernels: %s", exc)
                return
            row = self.store.one("SELECT sha256, source, created_at FROM kernels WHERE name=?", (name,))
            if row is None or tuple(row) != (manifest.sha256, manifest.source, manifest.created_at):
                self._record(manifest)
        elif not kdir.exists() and self.store.one("SELECT 1 FROM vms WHERE kernel=?", (name,)) is None:
            self.store.execute("DELETE FROM kernels WHERE name=?", (name,))

    def reconcile(self) -> None:
        """Make the store agree with the kernels directory (a crash may fall between rename and insert)."""
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(self.root)
        on_disk = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        rows = {r["name"] for r in self.store.query("SELECT name FROM kernels")}
        for name in sorted(on_disk - rows):
            try:
                self._record(read_manifest(self.root / name))
                log.info("kernels: recorded %s found on disk", name)
            except Exception as exc:  # a foreign or corrupt dir: leave it, say so
                log.warning("kernels: ignoring %s: %s", self.root / name, exc)
        for name in sorted(rows - on_disk):
            used = self.store.one("SELECT 1 FROM vms WHERE kernel=?", (name,))
            if used is None:
                self.store.execute("DELETE FROM kernels WHERE name=?", (name,))
                log.warning("kernels: dropped record of %s (its directory is gone)", name)

    def all(self) -> list[dict[str, Any]]:
        """Installed kernels, by name."""
        rows = self.store.query("SELECT manifest, path FROM kernels ORDER BY name")
        return [self._row_json(KernelManifest.from_json(json.loads(r["manifest"])), Path(r["path"])) for r in rows]

    def get(self, name: str) -> dict[str, Any]:
        """One installed kernel, or NotFoundError listing what is installed."""
        row = self.store.one("SELECT manifest, path FROM kernels WHERE name=?", (name,))
        if row is None:
            known = [r["name"] for r in self.store.query("SELECT name FROM kernels ORDER BY name")]
            raise NotFoundError(
                f"kernel {name!r} is not installed (installed: {', '.join(known) or 'none'})",
                hint="see `banger kernel list --available` and `banger kernel pull NAME`",
            )
        data = self._row_json(KernelManifest.from_json(json.loads(row["manifest"])), Path(row["path"]))
        data["used_by"] = [r["name"] for r in self.store.query("SELECT name FROM vms WHERE kernel=?", (name,))]
        return data

    # -- catalog ---------------------------------------------------------------------------------------------

    async def load_catalog(self, source: str | None = None) -> Catalog:
        """The catalog to use: `source` is the CLI's BANGER_CATALOG ("" when the CLI has none, so the config file
        decides, read now); None (no CLI involved) means the daemon's own settings, environment included."""
        if source:
            return await load_catalog(source)
        if source == "":
            configured = read_config_file(self.settings.paths.config_file).get("kernel_catalog")
            return await load_catalog(configured or None)
        return await load_catalog(Settings.load(self.settings.paths).kernel_catalog)

    async def catalog(self, source: str | None = None) -> dict[str, Any]:
        """Catalog entries annotated with STATE (pulled / available) and a human size."""
        cat = await self.load_catalog(source)
        installed = {r["name"]: r["sha256"] for r in self.store.query("SELECT name, sha256 FROM kernels")}
        entries = []
        for e in cat.entries:
            entries.append(
                {
                    **e.to_json(),
                    "state": "pulled" if e.name in installed else "available",
                    "size": human_size(e.size_bytes),
                }
            )
        return {"origin": cat.origin, "entries": entries}

    # -- operations ------------------------------------------------------------------------------------------

    async def pull(
        self, name: str, *, force: bool, catalog: str | None = None, progress: Progress = no_progress
    ) -> dict[str, Any]:
        """Download and install catalog kernel `name`."""
        entry = (await self.load_catalog(catalog)).get(name)
        try:
            manifest = await pull_kernel(entry, self.root, force=force, progress=progress)
        finally:
            self.sync(name)  # a cancel after the swap still leaves the store telling the truth
        return self._record(manifest)

    async def import_(
        self,
        path: str,
        *,
        name: str,
        distro: str | None,
        kernel_version: str | None,
        force: bool,
        progress: Progress = no_progress,
    ) -> dict[str, Any]:
        """Install a locally built kernel directory or bare vmlinux."""
        validate_name(name, "kernel name")
        try:
            manifest = await import_kernel(
                Path(path),
                self.root,
                name=name,
                distro=distro,
                kernel_version=kernel_version,
                force=force,
                progress=progress,
            )
        finally:
            self.sync(name)
        return self._record(manifest)

    async def remove(self, name: str) -> None:
        """Delete an installed kernel; refused while a VM uses it."""
        self.get(name)
        # The record goes first, in one transaction with the check: from then on no VM can be created on this
        # kernel (the vms -> kernels foreign key), and a cut-short removal leaves no ghost record behind.
        with self.store.transaction() as conn:
            users = [r["name"] for r in conn.execute("SELECT name FROM vms WHERE kernel=?", (name,))]
            if users:
                raise InUseError(f"kernel {name!r} is used by VM(s) {', '.join(users)}", hint="remove those VMs first")
            conn.execute("DELETE FROM kernels WHERE name=?", (name,))
        await asyncio.shield(remove_kernel_dir(self.root, name))

    async def bundle(self, name: str, out: str, url: str | None) -> dict[str, Any]:
        """Write a .tar.zst bundle of an installed kernel and its catalog entry."""
        info = self.get(name)
        out_path = Path(out)
        if not out_path.is_absolute():
            raise InvalidInputError(f"output path must be absolute, got {out!r}")
        if not out_path.parent.is_dir():
            raise NotFoundError(f"directory {out_path.parent} does not exist")
        sha, size = await in_thread(write_bundle, Path(info["path"]), out_path)
        entry = {
            "name": name,
            "distro": info["distro"],
            "arch": info["arch"],
            "kernel_version": info["kernel_version"],
            "tarball_url": url or out_path.as_uri(),
            "tarball_sha256": sha,
            "size_bytes": size,
            "description": f"{info['distro']} {info['kernel_version']} ({info['source']})",
        }
        return {"path": str(out_path), "entry": entry}

    async def build(
        self, source: str, *, name: str | None, package: str, force: bool, progress: Progress = no_progress
    ) -> dict[str, Any]:
        """Build a bootable kernel from a distribution's kernel package (only `debian` for now)."""
        if source != "debian":
            raise InvalidInputError(f"unknown kernel source {source!r} (supported: debian)")
        name = validate_name(name or self.settings.get("default_kernel"), "kernel name")
        target = self.root / name
        async with kernel_lock(self.root, name):
            if target.exists() and not force:
                raise AlreadyExistsError(f"kernel {name!r} is already installed", hint="use --force to rebuild it")
            with temp_sibling_dir(target, "build") as staging:
                out = staging / "k"
                cache_dir = self.settings.paths.cache / "debian"

                def work(cancel: threading.Event) -> debian.DebianKernelBuild:
                    def checked(event: ProgressEvent) -> None:
                        if cancel.is_set():  # between steps: stop here
                            raise CancelledError("kernel build was cancelled")
                        progress(event)

                    with proc.cancel_on(cancel):  # within steps: apt-get, dpkg-deb, depmod are killed
                        return debian.build_debian_kernel(out, package=package, cache_dir=cache_dir, progress=checked)

                result = await in_thread_cancellable(work)
                manifest = result.manifest(name)
                manifest.write(out)
                try:
                    await install_dir(out, target)
                finally:
                    self.sync(name)
        progress(ProgressEvent(step=f"kernel {name} ready", message=f"{manifest.kernel_version} ({manifest.source})"))
        return self._record(manifest)

    def boot_files(self, name: str) -> KernelManifest:
        """The manifest of an installed kernel, for VM creation."""
        info = self.get(name)
        return read_manifest(Path(info["path"]))
