"""Image records: what to build (ImageSpec), what was built (ImageInfo), sizes, and the steps reported."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from banger.errors import InvalidInputError
from banger.images.presets import Preset

# Bumped whenever the layout of what banger puts into an image changes; part of every cache key.
IMAGE_FORMAT_VERSION = 1

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZE = 2 * GiB
MIN_SIZE = 64 * MiB

_UNITS = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class BuildStep(StrEnum):
    """Labels of the progress events an image build or import emits, in order."""

    BOOTSTRAP = "bootstrap rootfs"
    CACHE_HIT = "reuse cached rootfs"
    EXTRACT = "extract rootfs"
    GUEST_SIDE = "add guest side"
    MKFS = "make ext4 image"


def parse_size(text: str) -> int:
    """'4G' / '512M' / '1.5GiB' / '1073741824' -> bytes (binary units), rounded up to whole MiB."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidInputError(f"invalid size {text!r}: use a number with an optional unit, e.g. 4G or 512M")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    size = -(-int(value) // MiB) * MiB
    if size < MIN_SIZE:
        raise InvalidInputError(f"size {text!r} is too small: images need at least {MIN_SIZE // MiB}M")
    return size


@dataclass(frozen=True)
class ImageSpec:
    """What `banger image build` asks for; None fields take the preset's defaults."""

    name: str
    preset: Preset = Preset.DEBIAN
    suite: str | None = None
    mirror: str | None = None
    packages: tuple[str, ...] = ()
    # None: DEFAULT_SIZE, grown when the rootfs needs more. An explicit size that is too small is an error.
    size_bytes: int | None = None
    arch: str | None = None
    keys_dir: Path | None = None


@dataclass(frozen=True)
class ImageInfo:
    """What a built or imported image is; also written (minus path fields) to /etc/banger/image.json inside it."""

    name: str
    source: str
    preset: str | None
    suite: str | None
    mirror: str | None
    packages: list[str]
    arch: str
    size_bytes: int
    rootfs_bytes: int
    banger_version: str
    format_version: int = IMAGE_FORMAT_VERSION
    built_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    cache_key: str | None = None
    cache_hit: bool = False
    # Guest-side helpers the rootfs lacks that the guest can live without (e.g. `ip` in a slim docker image).
    missing_optional: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageInfo:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def guest_json(self) -> dict[str, Any]:
        """The subset recorded inside the image: nothing that depends on the host or the cache."""
        keep = ("name", "source", "preset", "suite", "packages", "arch", "banger_version", "format_version", "built_at")
        return {k: v for k, v in self.to_json().items() if k in keep}
