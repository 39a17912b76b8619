"""Derived images: a base image plus Debian packages and/or plain files, built once and cached by their inputs.

One mechanism for everything banger adds to an image on the user's behalf: git and a repo's toolchains for
workspaces, the agent binary for agent VMs. A derived image is an ordinary image (a row in `images`, a file under
images/) named `<label or base>-<key>`, where the key hashes the base image's identity, the sorted package set, each
file's guest path, mode and content, and the banger version. Asking again with the same inputs finds it by name.

How the parts are added, without mounts and without touching the host's network namespace:
- packages: the base must come from the Debian preset; the derived image is rebuilt from the preset's mmdebstrap
  bootstrap with the extra packages (a bootstrap the host runs against Debian's archive, itself cached by its
  package set), then gets the guest side like any preset image;
- files: written into a copy of the image (grown with resize2fs) with `debugfs -w`, owned by root, mode as asked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from banger import __version__, proc
from banger.errors import InvalidInputError, ToolError, UnsupportedError
from banger.images.build import build_image
from banger.images.presets import Preset
from banger.images.spec import ImageInfo, ImageSpec, MiB
from banger.progress import Progress, ProgressEvent

log = logging.getLogger("banger.images.derived")

DERIVED_FORMAT = 1
STEP = "derive"
_DEBUGFS_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]+$")
_LABEL = re.compile(r"[^a-z0-9-]+")
TOOL_TIMEOUT = 600.0


@dataclass(frozen=True)
class DerivedFile:
    """A host file to place in the derived image (owned by root)."""

    host_path: Path
    guest_path: str
    mode: int = 0o755


@dataclass(frozen=True)
class DerivedSpec:
    """What to add to `base_image`; `label` names the result (default: the base image's name)."""

    base_image: str
    packages: tuple[str, ...] = ()
    files: tuple[DerivedFile, ...] = ()
    label: str = ""


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_spec(spec: DerivedSpec) -> None:
    """Refuse file entries debugfs cannot place safely (relative, `..`, odd characters, missing sources)."""
    for item in spec.files:
        for what, path in (("guest path", item.guest_path), ("host path", str(item.host_path))):
            if not _DEBUGFS_PATH.fullmatch(path) or "/../" in path + "/" or path.endswith("/"):
                raise InvalidInputError(f"derived image: unsupported {what} {path!r}")
        if not item.host_path.is_file():
            raise InvalidInputError(f"derived image: {item.host_path} is not a file")
        if not 0 <= item.mode <= 0o7777:
            raise InvalidInputError(f"derived image: bad mode {oct(item.mode)} for {item.guest_path}")


def derived_key(spec: DerivedSpec, base: ImageInfo) -> str:
    """Hex key over every input that changes what the derived image holds."""
    inputs = {
        "format": DERIVED_FORMAT,
        "banger": __version__,
        "base": {k: base.to_json().get(k) for k in ("name", "source", "cache_key", "built_at", "packages")},
        "packages": sorted(set(spec.packages)),
        "files": sorted((f.guest_path, f.mode, _file_digest(f.host_path)) for f in spec.files),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def derived_name(spec: DerivedSpec, key: str) -> str:
    """`<label>-<key>`, a valid image name (a DNS label)."""
    label = _LABEL.sub("-", (spec.label or spec.base_image).lower()).strip("-")[: 63 - len(key) - 1].strip("-")
    return f"{label or 'derived'}-{key}"


def image_has(image: Path, guest_path: str) -> bool:
    """Whether `guest_path` exists in the ext4 image (read-only debugfs, following no links)."""
    out = proc.run([proc.which("debugfs"), "-R", f"stat {guest_path}", str(image)], check=False, timeout=TOOL_TIMEOUT)
    return out.returncode == 0 and b"Inode:" in out.stdout


def build_derived(
    spec: DerivedSpec,
    name: str,
    key: str,
    base: ImageInfo,
    base_path: Path,
    out: Path,
    *,
    cache_dir: Path,
    progress: Progress,
    cancel: threading.Event | None = None,
) -> ImageInfo:
    """Make the derived image file `out` (blocking; run in a thread); returns its ImageInfo."""
    if spec.packages:
        if base.preset != Preset.DEBIAN:
            raise UnsupportedError(
                f"cannot add packages ({', '.join(spec.packages)}) to image {base.name!r}: it was not built by the "
                "Debian preset",
                hint="install them in the image yourself, or build one with `banger image build NAME --preset debian`",
            )
        progress(ProgressEvent(step=STEP, message=f"installing {' '.join(sorted(spec.packages))} into {name}"))
        log.info("derived image %s: installing %s on top of %s", name, ", ".join(spec.packages), base.name)
        image_spec = ImageSpec(
            name=name,
            preset=Preset.DEBIAN,
            suite=base.suite,
            mirror=base.mirror,
            packages=tuple(sorted(set(base.packages) | set(spec.packages))),
        )
        info = build_image(image_spec, out, cache_dir=cache_dir, progress=progress, cancel=cancel)
    else:
        progress(ProgressEvent(step=STEP, message=f"copying {base.name}"))
        proc.run(["cp", "--sparse=always", "--reflink=auto", "--", str(base_path), str(out)], timeout=TOOL_TIMEOUT)
        info = base
    if spec.files:
        add_files(out, spec.files, progress=progress)
    return dataclasses.replace(
        info,
        name=name,
        source=f"derived:{base.name}",
        cache_key=key,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        size_bytes=out.stat().st_size,
        packages=sorted(set(info.packages) | set(spec.packages)),
    )


def add_files(image: Path, files: tuple[DerivedFile, ...], *, progress: Progress) -> None:
    """Write host files into an (unmounted) ext4 image with debugfs, growing it first so they fit."""
    need = sum(f.host_path.stat().st_size for f in files) + 32 * MiB
    progress(ProgressEvent(step=STEP, message=f"adding {len(files)} file(s)"))
    e2fsck = proc.run([proc.which("e2fsck"), "-fy", str(image)], check=False, timeout=TOOL_TIMEOUT)
    if e2fsck.returncode not in (0, 1):
        raise ToolError(f"e2fsck found errors it could not fix in {image}")
    os.truncate(image, image.stat().st_size + need)
    proc.run([proc.which("resize2fs"), str(image)], timeout=TOOL_TIMEOUT, step="grow the image")
    lines: list[str] = []
    for f in files:
        parts = f.guest_path.strip("/").split("/")
        for i in range(1, len(parts)):
            lines.append("mkdir /" + "/".join(parts[:i]))  # an error for existing directories, which is fine
        lines += [
            f"rm {f.guest_path}",
            f"write {f.host_path} {f.guest_path}",
            f"sif {f.guest_path} mode 0{0o100000 | f.mode:o}",
            f"sif {f.guest_path} uid 0",
            f"sif {f.guest_path} gid 0",
        ]
    proc.run(
        [proc.which("debugfs"), "-w", "-f", "-", str(image)],
        input=("\n".join(lines) + "\n").encode(),
        timeout=TOOL_TIMEOUT,
        step="write files into the image",
    )
    # debugfs reports failed commands on stderr but exits 0: check every file landed, size and mode.
    for f in files:
        out = proc.run([proc.which("debugfs"), "-R", f"stat {f.guest_path}", str(image)], check=False).stdout.decode()
        size = re.search(r"Size: (\d+)", out)
        mode = re.search(r"Mode:\s+(\d+)", out)
        if not size or int(size.group(1)) != f.host_path.stat().st_size or not mode or int(mode.group(1), 8) != f.mode:
            raise ToolError(f"could not write {f.guest_path} into {image}")
