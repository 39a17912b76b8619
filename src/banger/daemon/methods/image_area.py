"""image.* methods: build, import, list, show, rm."""

from __future__ import annotations

from typing import Any

from banger.daemon.app import App
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    im = app.images

    @reg.method("image.list")
    async def list_(ctx: CallContext) -> list[dict[str, Any]]:
        """All images."""
        return im.all()

    @reg.method("image.show")
    async def show(ctx: CallContext, name: str) -> dict[str, Any]:
        """One image's record."""
        return im.get(name)

    @reg.method("image.build")
    async def build(
        ctx: CallContext,
        name: str,
        preset: str = "debian",
        suite: str | None = None,
        mirror: str | None = None,
        packages: list[str] | None = None,
        size: str | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Build an image from a preset."""
        with app.events.operation("image.build", name):
            return await im.build(
                name,
                preset=preset,
                suite=suite,
                mirror=mirror,
                packages=packages or [],
                size=size,
                force=force,
                progress=app.events.progress_tee(ctx.progress, op="image.build", name=name),
            )

    @reg.method("image.import")
    async def import_(
        ctx: CallContext, name: str, source: str, size: str | None = None, force: bool = False
    ) -> dict[str, Any]:
        """Import a rootfs tarball or directory as an image."""
        return await im.import_(name, source, size=size, force=force, progress=ctx.progress)

    @reg.method("image.rm")
    async def rm(ctx: CallContext, name: str) -> dict[str, Any]:
        """Remove an image (refused while a VM uses it)."""
        await im.remove(name)
        app.events.publish("image.removed", name=name)
        return {"removed": name}
