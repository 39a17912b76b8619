"""vm.workspace.* methods: workspace bytes in and out (host git runs in the CLI), and images with tooling."""

from __future__ import annotations

from typing import Any

from banger.daemon.app import App
from banger.errors import UnsupportedError
from banger.images.derived import DerivedSpec, image_has
from banger.images.presets import Preset
from banger.images.spec import ImageInfo
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    ws = app.workspaces

    @reg.method("vm.workspace.import")
    async def import_(
        ctx: CallContext,
        name: str,
        basename: str,
        host_path: str,
        base_commit: str,
        base_ref: str,
        head_commit: str,
        size: int,
        branch: str | None = None,
        git_name: str = "",
        git_email: str = "",
        user: str | None = None,
    ) -> dict[str, Any]:
        """Clone the bundle the CLI streams as `$/input` {data} chunks (then {eof}) into /workspace/BASENAME.

        Each chunk is acknowledged with a `$/event` {ack: bytes so far} once it is on its way to the guest."""
        result = await ws.import_(
            name,
            basename=basename,
            host_path=host_path,
            base_commit=base_commit,
            base_ref=base_ref,
            head_commit=head_commit,
            branch=branch,
            size=size,
            git_name=git_name,
            git_email=git_email,
            user=user,
            inbox=ctx.inbox,
            ack=lambda n: ctx.event({"ack": n}),
            progress=ctx.progress,
        )
        return result.to_json()

    @reg.method("vm.workspace.export")
    async def export(ctx: CallContext, name: str) -> dict[str, Any]:
        """The guest's work as a git bundle streamed in `$/event` {data} chunks, plus a summary against the base."""
        return await ws.export(name, ctx.send_event)

    @reg.method("vm.workspace.status")
    async def status(ctx: CallContext, name: str) -> dict[str, Any]:
        """commits_ahead, changed_files (and the changes) of the guest's work against the base."""
        workspace, summary = await ws.summary(name)
        return {**workspace.to_json(), **summary.to_json()}

    @reg.method("vm.workspace.show")
    async def show(ctx: CallContext, name: str) -> dict[str, Any]:
        """The workspace record of a VM."""
        return ws.of(name).to_json()

    @reg.method("vm.workspace.image")
    async def image(
        ctx: CallContext, image: str | None = None, packages: list[str] | None = None, need_git: bool = True
    ) -> dict[str, Any]:
        """The image a workspace VM boots: `image` plus git (when missing) and `packages`, as a cached derived image."""
        base = image or str(app.settings.get("default_image"))
        info = app.images.info_of(base)
        has_git = not need_git or "git" in info.packages or await _has_git(app, base)
        wanted = packages_to_add(info, packages or [], has_git=has_git)
        if not wanted:
            return {"image": base, "derived": False, "packages": []}
        name = await app.images.ensure_derived(DerivedSpec(base, tuple(wanted), label=base), progress=ctx.progress)
        return {"image": name, "derived": True, "packages": wanted, "base_image": base}


def packages_to_add(info: ImageInfo, packages: list[str], *, has_git: bool) -> list[str]:
    """The packages a workspace VM's image needs on top of `info`: the plan's, plus git when it lacks it."""
    wanted = sorted(set(packages))
    if has_git:
        return wanted
    if info.preset != Preset.DEBIAN:
        raise UnsupportedError(
            f"image {info.name!r} has no git and was not built by the Debian preset, so banger cannot add it",
            hint="install git in that image, or use an image built with `--preset debian`",
        )
    return sorted({*wanted, "git"})


async def _has_git(app: App, image: str) -> bool:
    import asyncio

    return await asyncio.to_thread(image_has, app.images.path_of(image), "/usr/bin/git")
