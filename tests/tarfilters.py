"""A fixture that runs a test module twice: with tarfile's extraction filters, and without them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from banger import tarcompat


@pytest.fixture(autouse=True, scope="module", params=["stdlib-filters", "no-stdlib-filters"])
def tar_filters(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test of a module importing this runs twice: with tarfile's extraction filters, and as on Debian 12's
    Python 3.11.2, which predates them (banger.tarcompat then applies the filters by hand)."""
    saved = tarcompat.HAS_FILTERS
    if request.param == "no-stdlib-filters":
        tarcompat.HAS_FILTERS = False
    try:
        yield
    finally:
        tarcompat.HAS_FILTERS = saved
