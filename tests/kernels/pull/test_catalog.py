"""Catalog parsing and loading: packaged, from a file, from a loopback URL; every malformation named."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from banger.errors import DownloadError, InvalidInputError, NotFoundError
from banger.kernels.catalog import load_catalog, parse_catalog
from tests.kernels.pull.conftest import LoopbackServer, Route

ENTRY: dict[str, Any] = {
    "name": "debian-cloud",
    "distro": "debian",
    "arch": "x86_64",
    "kernel_version": "6.1.0-27-cloud-amd64",
    "tarball_url": "https://example.invalid/k.tar.zst",
    "tarball_sha256": "ab" * 32,
    "size_bytes": 12345,
    "description": "Debian cloud kernel",
}


def catalog(*entries: object, version: object = 1) -> str:
    return json.dumps({"version": version, "entries": list(entries)})


def test_packaged_catalog_loads() -> None:
    cat = asyncio.run(load_catalog(None))
    assert cat.version == 1 and cat.origin == "packaged catalog"
    assert len(cat.names()) == len(set(cat.names()))


def test_parse_and_lookup() -> None:
    other = dict(ENTRY, name="alpine-virt")
    cat = parse_catalog(catalog(ENTRY, other), "test")
    assert cat.names() == ["debian-cloud", "alpine-virt"]
    assert cat.get("alpine-virt").size_bytes == 12345
    assert cat.get("debian-cloud").to_json() == ENTRY
    with pytest.raises(NotFoundError, match="known: debian-cloud, alpine-virt"):
        cat.get("nope")
    with pytest.raises(NotFoundError, match="catalog is empty"):
        parse_catalog(catalog(), "test").get("nope")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (json.dumps({"entries": []}), "no 'version'"),
        (catalog(version=2), "unknown catalog version 2"),
        (catalog(version=True), "unknown catalog version"),
        (json.dumps({"version": 1, "entries": {}}), "'entries' must be a list"),
        (catalog("x"), r"entries\[0\]: must be an object"),
        (catalog({k: v for k, v in ENTRY.items() if k != "tarball_sha256"}), "missing field.*tarball_sha256"),
        (catalog(dict(ENTRY, size_bytes="12")), "'size_bytes' must be a non-negative integer"),
        (catalog(dict(ENTRY, size_bytes=-1)), "'size_bytes' must be a non-negative integer"),
        (catalog(dict(ENTRY, arch=64)), "'arch' must be a string"),
        (catalog(dict(ENTRY, tarball_sha256="xyz")), "64 lowercase hex"),
        (catalog(dict(ENTRY, tarball_url="ftp://example.invalid/k.tar.zst")), "http"),
        (catalog(dict(ENTRY, name="../evil")), "invalid name"),
        (catalog(ENTRY, ENTRY), "duplicate kernel name 'debian-cloud'"),
    ],
)
def test_malformed_catalogs_are_named(text: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle) as err:
        parse_catalog(text, "my.json")
    assert str(err.value).startswith("my.json")


def test_load_from_file_and_url(http_server: LoopbackServer, tmp_path: Path) -> None:
    path = tmp_path / "cat.json"
    path.write_text(catalog(ENTRY))
    assert asyncio.run(load_catalog(str(path))).names() == ["debian-cloud"]
    url = http_server.add("/cat.json", Route(body=catalog(ENTRY).encode()))
    cat = asyncio.run(load_catalog(url))
    assert cat.names() == ["debian-cloud"] and cat.origin == url
    with pytest.raises(NotFoundError, match="does not exist"):
        asyncio.run(load_catalog(str(tmp_path / "missing.json")))
    with pytest.raises(DownloadError, match="HTTP 404"):
        asyncio.run(load_catalog(http_server.base + "/missing.json"))
    bad = http_server.add("/bad.json", Route(body=b"{"))
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        asyncio.run(load_catalog(bad))
