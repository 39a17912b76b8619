"""The manifest.json beside every installed kernel: what it is, where it came from, what it boots on."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from banger.errors import BangerError
from banger.fsutil import atomic_write

MANIFEST = "manifest.json"
VMLINUX = "vmlinux"
INITRD = "initrd.img"
CONFIG = "config"
CMDLINE = "cmdline"
MODULES = "modules"


@dataclass(frozen=True)
class KernelManifest:
    """Metadata of one installed kernel (`<kernels dir>/<name>/manifest.json`)."""

    name: str
    distro: str
    arch: str
    kernel_version: str
    sha256: str
    source: str
    size_bytes: int
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # What the kernel can boot on, e.g. {"firecracker": true, "qemu-microvm": true} (ELF entry / PVH note).
    boots_on: dict[str, bool] = field(default_factory=dict)
    has_initrd: bool = False
    has_modules: bool = False
    cmdline: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelManifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, kernel_dir: Path) -> None:
        """Write manifest.json atomically into `kernel_dir`."""
        atomic_write(kernel_dir / MANIFEST, (json.dumps(self.to_json(), indent=2) + "\n").encode())


def read_manifest(kernel_dir: Path) -> KernelManifest:
    """Load `kernel_dir/manifest.json`, with a clear error when missing or corrupt."""
    path = kernel_dir / MANIFEST
    try:
        return KernelManifest.from_json(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise BangerError(f"kernel at {kernel_dir} has no {MANIFEST}") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise BangerError(f"{path}: corrupt manifest: {exc}") from exc
