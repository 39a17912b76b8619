"""Size parsing and the ImageInfo record."""

from __future__ import annotations

import pytest

from banger.errors import InvalidInputError
from banger.images.spec import GiB, ImageInfo, MiB, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4G", 4 * GiB),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("2GiB", 2 * GiB),
        ("1.5G", 1536 * MiB),
        ("1T", 1024 * GiB),
        ("65536K", 64 * MiB),
        (" 100MB ", 100 * MiB),
        (str(128 * MiB), 128 * MiB),
        (str(128 * MiB + 1), 129 * MiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "4 G B", "four", "1e9", "4GG"])
def test_parse_size_garbage(text: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid size"):
        parse_size(text)


def test_parse_size_too_small() -> None:
    with pytest.raises(InvalidInputError, match="too small"):
        parse_size("10M")


def test_image_info_round_trip() -> None:
    info = ImageInfo(
        name="x",
        source="preset:debian",
        preset="debian",
        suite="bookworm",
        mirror="http://m/debian",
        packages=["python3"],
        arch="x86_64",
        size_bytes=GiB,
        rootfs_bytes=1,
        banger_version="0",
    )
    assert ImageInfo.from_json({**info.to_json(), "future_field": 1}) == info
    assert "mirror" not in info.guest_json() and info.guest_json()["suite"] == "bookworm"
