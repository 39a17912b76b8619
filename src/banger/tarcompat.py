"""tarfile's extraction filters (PEP 706) where Python has them, and the same guarantees where it has not.

Debian 12's python3 is 3.11.2, older than the filters (3.11.4). Banger's own member checks (kernels/safetar.py,
images/tarball.py) do the safety work either way; this module only bridges the API: extract with a filter,
TarInfo.replace, the data filter's mode clean-up, and FilterError.
"""

from __future__ import annotations

import copy
import tarfile
from collections.abc import Callable
from typing import Any

HAS_FILTERS = hasattr(tarfile, "data_filter")

Filter = Callable[[tarfile.TarInfo, str], "tarfile.TarInfo | None"]


class _NoFilterError(Exception):
    """Stands in for tarfile.FilterError where it does not exist (nothing raises it then)."""


FilterError: type[Exception] = getattr(tarfile, "FilterError", _NoFilterError)


def replace(member: tarfile.TarInfo, **changes: Any) -> tarfile.TarInfo:
    """A copy of `member` with `changes` (TarInfo.replace where it exists)."""
    if HAS_FILTERS:
        return member.replace(**changes, deep=False)
    clone = copy.copy(member)
    for key, value in changes.items():
        setattr(clone, key, value)
    return clone


def data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile.data_filter, or (without it) its mode clean-up; callers have already checked names and links."""
    if HAS_FILTERS:
        return tarfile.data_filter(member, dest)
    if member.isreg() or member.islnk():
        # As the data filter does: no setuid/setgid/sticky, no group/other write, owner can read and write.
        return replace(member, mode=(member.mode & 0o755) | 0o600)
    if member.isdir():
        return replace(member, mode=0o755)
    return member


def extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: str, flt: Filter, **kwargs: Any) -> None:
    """tar.extract(member, dest, filter=flt), applying the filter by hand where tarfile cannot."""
    if HAS_FILTERS:
        tar.extract(member, dest, filter=flt, **kwargs)
        return
    filtered = flt(member, dest)
    if filtered is not None:
        tar.extract(filtered, dest, **kwargs)


def extractall(tar: tarfile.TarFile, dest: str, flt: Filter, **kwargs: Any) -> None:
    """tar.extractall(dest, filter=flt), or member by member with the filter applied by hand."""
    if HAS_FILTERS:
        tar.extractall(dest, filter=flt, **kwargs)
        return
    for member in tar:
        extract(tar, member, dest, flt, **kwargs)
