"""`banger image import`: any root filesystem (a tarball such as `docker export` output, or a directory) -> image.

Tarballs go through the safe extractor (banger.images.tarball: traversal refused, device nodes skipped); a directory
is copied with `cp -a` so the caller's tree is never modified. Either way the guest side is added to the copy.
"""

from __future__ import annotations

import threading
from pathlib import Path

from banger import __version__, proc
from banger.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from banger.fsutil import dir_size, temp_sibling_dir
from banger.images.build import finish_image
from banger.images.guestside import check_rootfs
from banger.images.presets import host_arch
from banger.images.spec import BuildStep, ImageInfo
from banger.images.tarball import extract_rootfs, is_probably_tar
from banger.progress import Progress, ProgressEvent


def import_rootfs(
    src: Path,
    out_path: Path,
    *,
    progress: Progress,
    name: str | None = None,
    size_bytes: int | None = None,
    cancel: threading.Event | None = None,
) -> ImageInfo:
    """Make the ext4 image `out_path` from the rootfs tarball or directory `src`, adding banger's guest side.

    Blocking (run it in a thread); setting `cancel` stops it at the next check, leaving nothing behind."""
    if out_path.exists():
        raise AlreadyExistsError(f"image file {out_path} already exists")
    src = src.absolute()
    if not src.exists():
        raise NotFoundError(f"rootfs {src} does not exist")
    is_dir = src.is_dir()
    if not is_dir and not is_probably_tar(src):
        raise InvalidInputError(f"{src} is neither a directory nor a tar archive (plain, gz, bz2, xz or zst)")
    if is_dir:
        # Fail before copying hundreds of megabytes; the copy is checked again after the guest side needs it.
        check_rootfs(src)
    with temp_sibling_dir(out_path, "import") as work:
        stage = work / "rootfs"
        progress(ProgressEvent(step=BuildStep.EXTRACT, message=str(src)))
        if is_dir:
            # cp -a keeps owners, modes, hard links, xattrs and device nodes exactly as the tree has them.
            proc.run(["cp", "-a", "--", f"{src}/.", str(stage)], step="copy rootfs directory", timeout=3600)
            rootfs_bytes = dir_size(stage)
        else:
            stage.mkdir(mode=0o755)
            extract_rootfs(src, stage, progress=progress, step=BuildStep.EXTRACT, cancel=cancel)
            rootfs_bytes = src.stat().st_size
        info = ImageInfo(
            name=name or out_path.stem,
            source=f"import:{src}",
            preset=None,
            suite=None,
            mirror=None,
            packages=[],
            arch=host_arch(),
            size_bytes=0,
            rootfs_bytes=rootfs_bytes,
            banger_version=__version__,
        )
        return finish_image(stage, out_path, info, requested_size=size_bytes, progress=progress, cancel=cancel)
