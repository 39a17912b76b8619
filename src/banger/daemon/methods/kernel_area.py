"""kernel.* methods: catalog, pull, import, build, list, show, rm, bundle."""

from __future__ import annotations

from typing import Any

from banger.daemon.app import App
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    k = app.kernels

    @reg.method("kernel.list")
    async def list_(ctx: CallContext) -> list[dict[str, Any]]:
        """Installed kernels."""
        return k.all()

    @reg.method("kernel.catalog")
    async def catalog(ctx: CallContext, catalog: str | None = None) -> dict[str, Any]:
        """The catalog (the daemon's, or the one named by `catalog`), each entry marked pulled or available."""
        return await k.catalog(catalog)

    @reg.method("kernel.show")
    async def show(ctx: CallContext, name: str) -> dict[str, Any]:
        """One installed kernel's manifest."""
        return k.get(name)

    @reg.method("kernel.pull")
    async def pull(ctx: CallContext, name: str, force: bool = False, catalog: str | None = None) -> dict[str, Any]:
        """Download, verify and install a catalog kernel."""
        with app.events.operation("kernel.pull", name):
            progress = app.events.progress_tee(ctx.progress, op="kernel.pull", name=name)
            return await k.pull(name, force=force, catalog=catalog, progress=progress)

    @reg.method("kernel.import")
    async def import_(
        ctx: CallContext,
        path: str,
        name: str,
        distro: str | None = None,
        kernel_version: str | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Install a locally built kernel (directory or bare vmlinux)."""
        return await k.import_(
            path, name=name, distro=distro, kernel_version=kernel_version, force=force, progress=ctx.progress
        )

    @reg.method("kernel.build")
    async def build(
        ctx: CallContext,
        source: str = "debian",
        name: str | None = None,
        package: str = "linux-image-cloud-amd64",
        force: bool = False,
    ) -> dict[str, Any]:
        """Build a bootable kernel from a distribution kernel package."""
        with app.events.operation("kernel.build", name or package):
            progress = app.events.progress_tee(ctx.progress, op="kernel.build", name=name or package)
            return await k.build(source, name=name, package=package, force=force, progress=progress)

    @reg.method("kernel.rm")
    async def rm(ctx: CallContext, name: str) -> dict[str, Any]:
        """Remove an installed kernel (refused while a VM uses it)."""
        await k.remove(name)
        app.events.publish("kernel.removed", name=name)
        return {"removed": name}

    @reg.method("kernel.bundle")
    async def bundle(ctx: CallContext, name: str, output: str, url: str | None = None) -> dict[str, Any]:
        """Write a .tar.zst bundle of an installed kernel; returns its catalog entry."""
        return await k.bundle(name, output, url)
