"""`banger image build`: bootstrap a preset's rootfs (cached by its inputs), add the guest side, make ext4.

Cache layout under `cache_dir`: `rootfs/<key>.tar` (the bootstrapped rootfs, numeric owners, device nodes included),
`rootfs/<key>.json` (the inputs that produced it) and `rootfs/<key>.d/` (the tarball extracted once, hard-linked
into each build's staging tree when on the same filesystem). The key hashes every input of the bootstrap: preset, suite,
mirror, sorted package set, architecture, the init stub's content and IMAGE_FORMAT_VERSION. A warm build only
links the cached tree, adds the guest side and runs mkfs.ext4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from banger import __version__, proc
from banger.errors import AlreadyExistsError, CancelledError, ConfigError, InvalidInputError
from banger.fsutil import atomic_write, temp_sibling_dir
from banger.images.guestside import add_guest_side, check_rootfs, stub_sha256
from banger.images.mkfs import choose_size, make_ext4
from banger.images.presets import BOOTSTRAP_OUTPUT, BootstrapOutput, BootstrapPlan, bootstrap_command, make_plan
from banger.images.runner import run_streaming
from banger.images.spec import IMAGE_FORMAT_VERSION, BuildStep, ImageInfo, ImageSpec, MiB
from banger.images.tarball import extract_rootfs, pack_rootfs
from banger.progress import Progress, ProgressEvent

BOOTSTRAP_TIMEOUT = 30 * 60.0
_TOOL_HINTS = {
    "mmdebstrap": "install mmdebstrap (apt-get install mmdebstrap)",
    "apk.static": "download apk-tools-static from an Alpine mirror and put apk.static on PATH",
    "xbps-install.static": "download xbps-static from a Void mirror and put xbps-install.static on PATH",
}


def plan_for(spec: ImageSpec) -> BootstrapPlan:
    """The validated bootstrap plan for `spec` (defaults filled in)."""
    return make_plan(
        spec.preset,
        suite=spec.suite,
        mirror=spec.mirror,
        packages=spec.packages,
        arch=spec.arch,
        keys_dir=spec.keys_dir,
    )


def cache_key(plan: BootstrapPlan) -> str:
    """Hex key naming the cached rootfs for `plan`: covers every input that changes what gets bootstrapped."""
    inputs = {
        "format": IMAGE_FORMAT_VERSION,
        "preset": str(plan.preset),
        "suite": plan.suite,
        "mirror": plan.mirror,
        "packages": sorted(plan.packages),
        "arch": plan.arch,
        "stub": stub_sha256(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def cached_rootfs(cache_dir: Path, key: str) -> Path:
    """Where the bootstrapped rootfs tarball for `key` lives."""
    return cache_dir / "rootfs" / f"{key}.tar"


def bootstrap(plan: BootstrapPlan, out_tar: Path, *, progress: Progress, cancel: threading.Event | None = None) -> None:
    """Run the preset's bootstrap and leave its rootfs as the tarball `out_tar` (nothing on failure)."""
    progress(ProgressEvent(step=BuildStep.BOOTSTRAP, message=f"{plan.preset} {plan.suite} from {plan.mirror}"))
    with temp_sibling_dir(out_tar, "bootstrap") as work:
        staged_tar = work / "rootfs.tar"
        root = work / "root"
        root.mkdir(mode=0o755)
        makes_tar = BOOTSTRAP_OUTPUT[plan.preset] is BootstrapOutput.TAR
        cmd = bootstrap_command(plan, staged_tar if makes_tar else root)
        if cmd.keys_dir is not None and not cmd.keys_dir.is_dir():
            raise ConfigError(
                f"{plan.preset} repository signing keys not found in {cmd.keys_dir}",
                hint=f"put the {plan.preset} signing keys there, or pass keys_dir in the image spec",
            )
        if cmd.keys_dir is not None and cmd.keys_into_root is not None:
            shutil.copytree(cmd.keys_dir, root / cmd.keys_into_root)
        argv = [proc.which(cmd.argv[0], hint=_TOOL_HINTS.get(cmd.argv[0])), *cmd.argv[1:]]
        run_streaming(
            argv,
            env=cmd.env,
            step=f"bootstrap {plan.preset} rootfs",
            progress=_relabel(progress, BuildStep.BOOTSTRAP),
            timeout=BOOTSTRAP_TIMEOUT,
            cancel=cancel,
        )
        if cmd.output is BootstrapOutput.DIR:
            pack_rootfs(root, staged_tar, progress=progress, step=BuildStep.BOOTSTRAP)
        os.replace(staged_tar, out_tar)
    meta = {"plan": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(plan).items()}}
    atomic_write(out_tar.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    progress(ProgressEvent(step=BuildStep.BOOTSTRAP, message="done"))


def cached_tree(tar: Path) -> Path:
    """The extracted copy of a cached rootfs tarball, kept beside it so warm builds can hard-link it."""
    return tar.with_suffix(".d")


def stage_from_cache(tar: Path, stage: Path, *, progress: Progress, cancel: threading.Event | None = None) -> None:
    """Fill the new directory `stage` with the cached rootfs: hard links to its extracted tree when on the same
    filesystem (a warm build then costs about a second), else a fresh extraction of the tarball.

    Hard links are safe only because nothing writes into a staged file in place: add_guest_side replaces files
    (unlink + create) and mkfs.ext4 only reads."""
    tree = cached_tree(tar)
    progress(ProgressEvent(step=BuildStep.EXTRACT, message=str(tar)))
    if not tree.is_dir():
        with temp_sibling_dir(tree, "extract") as tmp:
            extract_rootfs(tar, tmp, progress=progress, step=BuildStep.EXTRACT, cancel=cancel)
            os.chmod(tmp, 0o755)
            os.replace(tmp, tree)
    check_cancel(cancel, BuildStep.EXTRACT)
    if os.stat(tree).st_dev == os.stat(stage.parent).st_dev:
        proc.run(["cp", "-al", "--", f"{tree}/.", str(stage)], step="link cached rootfs", timeout=3600)
    else:
        stage.mkdir(mode=0o755)
        extract_rootfs(tar, stage, progress=progress, step=BuildStep.EXTRACT, cancel=cancel)


def prune_cache(cache_dir: Path, *, keep: int) -> list[str]:
    """Delete all but the `keep` most recently used cached rootfs entries; returns the removed keys."""
    root = cache_dir / "rootfs"
    if not root.is_dir():
        return []

    def last_used(tar: Path) -> float:
        meta = tar.with_suffix(".json")
        return (meta if meta.exists() else tar).stat().st_mtime

    entries = sorted(root.glob("*.tar"), key=last_used, reverse=True)
    removed = []
    for tar in entries[keep:]:
        shutil.rmtree(cached_tree(tar), ignore_errors=True)
        tar.with_suffix(".json").unlink(missing_ok=True)
        tar.unlink(missing_ok=True)
        removed.append(tar.stem)
    return removed


def _relabel(progress: Progress, step: str) -> Progress:
    """Report a tool's output lines under the build's own step label."""
    return lambda event: progress(dataclasses.replace(event, step=step))


def check_cancel(cancel: threading.Event | None, step: str) -> None:
    """Raise CancelledError if `cancel` is set (checked between the steps that cannot be interrupted)."""
    if cancel is not None and cancel.is_set():
        raise CancelledError(f"{step}: cancelled")


def finish_image(
    stage: Path,
    out_path: Path,
    info: ImageInfo,
    *,
    requested_size: int | None,
    progress: Progress,
    cancel: threading.Event | None = None,
) -> ImageInfo:
    """Check the staged rootfs, add the guest side, and mkfs it into `out_path` atomically; returns the final info."""
    check_cancel(cancel, BuildStep.GUEST_SIDE)
    progress(ProgressEvent(step=BuildStep.GUEST_SIDE))
    missing = check_rootfs(stage)
    size = choose_size(stage, requested_size)
    info = dataclasses.replace(info, size_bytes=size, missing_optional=missing)
    add_guest_side(stage, info)
    tmp_image = stage.parent / "image.ext4"
    check_cancel(cancel, BuildStep.MKFS)
    make_ext4(stage, tmp_image, size, progress=progress)
    if out_path.exists():
        raise AlreadyExistsError(f"image file {out_path} already exists")
    os.replace(tmp_image, out_path)
    return info


def build_image(
    spec: ImageSpec,
    out_path: Path,
    *,
    cache_dir: Path,
    progress: Progress,
    cancel: threading.Event | None = None,
) -> ImageInfo:
    """Build the ext4 image `out_path` for `spec`, reusing a cached bootstrap when its inputs are unchanged.

    Blocking (run it in a thread); setting `cancel` stops it at the next check, leaving nothing behind."""
    if out_path.exists():
        raise AlreadyExistsError(f"image file {out_path} already exists")
    plan = plan_for(spec)
    key = cache_key(plan)
    tar = cached_rootfs(cache_dir, key)
    hit = tar.is_file()
    if hit:
        progress(ProgressEvent(step=BuildStep.CACHE_HIT, message=str(tar)))
        # The sidecar's mtime records last use, for prune_cache.
        with contextlib.suppress(FileNotFoundError):
            os.utime(tar.with_suffix(".json"))
    else:
        bootstrap(plan, tar, progress=progress, cancel=cancel)
    if spec.size_bytes is not None and spec.size_bytes < tar.stat().st_size:
        # Obvious misfits fail before the extraction; finish_image makes the precise check.
        raise InvalidInputError(
            f"image size {spec.size_bytes // MiB}M is too small for this rootfs "
            f"(needs more than {tar.stat().st_size // MiB}M)"
        )
    with temp_sibling_dir(out_path, "build") as work:
        stage = work / "rootfs"
        stage_from_cache(tar, stage, progress=progress, cancel=cancel)
        info = ImageInfo(
            name=spec.name,
            source=f"preset:{plan.preset}",
            preset=str(plan.preset),
            suite=plan.suite,
            mirror=plan.mirror,
            packages=list(plan.packages),
            arch=plan.arch,
            size_bytes=0,
            rootfs_bytes=tar.stat().st_size,
            banger_version=__version__,
            cache_key=key,
            cache_hit=hit,
        )
        return finish_image(stage, out_path, info, requested_size=spec.size_bytes, progress=progress, cancel=cancel)
