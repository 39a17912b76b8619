"""First-run preparation for `vm run`: make sure the kernel and image a VM needs exist."""

from __future__ import annotations

from typing import Any

from banger.errors import NotFoundError
from banger.images.service import ImageService
from banger.kernels.service import KernelService
from banger.progress import Progress, ProgressEvent


async def ensure_boot_artifacts(
    kernels: KernelService,
    images: ImageService,
    *,
    kernel: str,
    image: str,
    default_kernel: str,
    default_image: str,
    progress: Progress,
    catalog: str | None = None,
) -> dict[str, Any]:
    """Pull or build the kernel, and build the image, when missing; only the defaults are made automatically."""
    done: dict[str, Any] = {"kernel": "present", "image": "present"}
    try:
        kernels.get(kernel)
    except NotFoundError:
        if kernel != default_kernel:
            raise
        if kernel in (await kernels.load_catalog(catalog)).names():
            progress(ProgressEvent(step=f"kernel {kernel} missing: pulling it"))
            await kernels.pull(kernel, force=False, catalog=catalog, progress=progress)
            done["kernel"] = "pulled"
        else:
            progress(ProgressEvent(step=f"kernel {kernel} missing: building it from Debian's kernel package"))
            await kernels.build(
                "debian", name=kernel, package="linux-image-cloud-amd64", force=False, progress=progress
            )
            done["kernel"] = "built"
    try:
        images.get(image)
    except NotFoundError:
        if image != default_image:
            raise
        progress(ProgressEvent(step=f"image {image} missing: building it (debian bookworm)"))
        await images.build(
            image,
            preset="debian",
            suite="bookworm",
            mirror=None,
            packages=[],
            size=None,
            force=False,
            progress=progress,
        )
        done["image"] = "built"
    return done
