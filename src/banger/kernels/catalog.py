"""The kernel catalog: a JSON list of pullable kernel bundles, packaged or named by BANGER_CATALOG / config.

Format (version 1)::

    {"version": 1, "entries": [{"name": "...", "distro": "...", "arch": "x86_64", "kernel_version": "6.1.0",
      "tarball_url": "https://.../k.tar.zst", "tarball_sha256": "<64 hex>", "size_bytes": 123,
      "description": "..."}]}

`tarball_url` may also be a file:/// URL (a local bundle, e.g. one written by `banger kernel bundle`).
`size_bytes` is the size of the compressed tarball; pull uses it for progress and to cap decompression.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from banger.errors import DownloadError, InvalidInputError, NotFoundError
from banger.names import is_dns_label

CATALOG_VERSION = 1
MAX_CATALOG_BYTES = 16 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FETCH_TIMEOUT = httpx.Timeout(30.0)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One pullable kernel bundle."""

    name: str
    distro: str
    arch: str
    kernel_version: str
    tarball_url: str
    tarball_sha256: str
    size_bytes: int
    description: str

    def to_json(self) -> dict[str, Any]:
        """The entry as the catalog's JSON object."""
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class Catalog:
    """A parsed catalog; `origin` says where it came from (for error messages)."""

    version: int
    entries: tuple[CatalogEntry, ...]
    origin: str

    def names(self) -> list[str]:
        """Entry names in catalog order."""
        return [e.name for e in self.entries]

    def get(self, name: str) -> CatalogEntry:
        """The entry called `name`, or a NotFoundError listing the known names."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        known = ", ".join(self.names()) or "none; the catalog is empty"
        raise NotFoundError(f"no kernel {name!r} in catalog {self.origin} (known: {known})")


_STR_FIELDS = ("name", "distro", "arch", "kernel_version", "tarball_url", "tarball_sha256", "description")


def _entry(raw: object, index: int, origin: str) -> CatalogEntry:
    where = f"{origin}: entries[{index}]"
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where}: must be an object, got {type(raw).__name__}")
    missing = [f for f in (*_STR_FIELDS, "size_bytes") if f not in raw]
    if missing:
        raise InvalidInputError(f"{where}: missing field(s) {', '.join(missing)}")
    for f in _STR_FIELDS:
        if not isinstance(raw[f], str):
            raise InvalidInputError(f"{where}: field {f!r} must be a string, got {type(raw[f]).__name__}")
    size = raw["size_bytes"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInputError(f"{where}: field 'size_bytes' must be a non-negative integer, got {size!r}")
    name = raw["name"]
    if not is_dns_label(name):
        raise InvalidInputError(f"{where}: invalid name {name!r} (1-63 lowercase letters, digits, inner hyphens)")
    if not _SHA256.match(raw["tarball_sha256"]):
        raise InvalidInputError(f"{where} ({name}): 'tarball_sha256' must be 64 lowercase hex digits")
    if not raw["tarball_url"].startswith(("http://", "https://", "file:///")):
        raise InvalidInputError(f"{where} ({name}): 'tarball_url' must be an http(s) or file:/// URL")
    return CatalogEntry(
        name=name,
        distro=raw["distro"],
        arch=raw["arch"],
        kernel_version=raw["kernel_version"],
        tarball_url=raw["tarball_url"],
        tarball_sha256=raw["tarball_sha256"],
        size_bytes=size,
        description=raw["description"],
    )


def parse_catalog(text: str | bytes, origin: str = "<catalog>") -> Catalog:
    """Parse and validate catalog JSON; any defect is an InvalidInputError naming it."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{origin}: catalog is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{origin}: catalog must be a JSON object")
    if "version" not in data:
        raise InvalidInputError(f"{origin}: catalog has no 'version'")
    version = data["version"]
    if version != CATALOG_VERSION or isinstance(version, bool):
        raise InvalidInputError(f"{origin}: unknown catalog version {version!r} (supported: {CATALOG_VERSION})")
    entries_raw = data.get("entries")
    if not isinstance(entries_raw, list):
        raise InvalidInputError(f"{origin}: catalog 'entries' must be a list")
    entries = tuple(_entry(raw, i, origin) for i, raw in enumerate(entries_raw))
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise InvalidInputError(f"{origin}: duplicate kernel name {entry.name!r}")
        seen.add(entry.name)
    return Catalog(version=version, entries=entries, origin=origin)


def packaged_catalog_text() -> str:
    """The catalog.json shipped inside the banger package."""
    return resources.files("banger.kernels").joinpath("catalog.json").read_text()


async def load_catalog(source: str | None) -> Catalog:
    """Load the catalog from `source` (file path or http(s) URL), or the packaged one when None."""
    if source is None:
        return parse_catalog(packaged_catalog_text(), "packaged catalog")
    if source.startswith(("http://", "https://")):
        try:
            async with httpx.AsyncClient(timeout=_FETCH_TIMEOUT, follow_redirects=True) as client:
                async with client.stream("GET", source) as resp:
                    if resp.status_code != 200:
                        raise DownloadError(
                            f"cannot fetch catalog {source}: HTTP {resp.status_code} {resp.reason_phrase}"
                        )
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_CATALOG_BYTES:
                            raise InvalidInputError(f"catalog {source} is larger than {MAX_CATALOG_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise DownloadError(f"cannot fetch catalog {source}: {exc}") from exc
        return parse_catalog(bytes(body), source)
    path = Path(source).expanduser()
    text = await asyncio.to_thread(_read_catalog_file, path)
    return parse_catalog(text, str(path))


def _read_catalog_file(path: Path) -> bytes:
    """A regular file's bytes, capped: a FIFO or /dev/zero named as the catalog must not hang or flood the daemon."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise NotFoundError(f"kernel catalog {path} does not exist") from exc
    except OSError as exc:
        raise InvalidInputError(f"cannot read kernel catalog {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"kernel catalog {path} is not a regular file")
    if st.st_size > MAX_CATALOG_BYTES:
        raise InvalidInputError(f"kernel catalog {path} is larger than {MAX_CATALOG_BYTES} bytes")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read kernel catalog {path}: {exc.strerror}") from exc
