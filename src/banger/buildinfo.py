"""Version, git commit and build date: stamped at install time, else read from git in a checkout.

Kept import-light (no dataclasses, subprocess only on the fallback): `banger version` runs through here.
"""

from __future__ import annotations

import collections
import json
import os

from banger import __version__

_STAMP = os.path.join(os.path.dirname(__file__), "_buildinfo.json")


TYPE_CHECKING = False  # typing costs `vm exec`'s fast path milliseconds (it sends code_id at the handshake)
if TYPE_CHECKING:
    from typing import NamedTuple

    class BuildInfo(NamedTuple):
        version: str
        commit: str | None
        date: str | None
        source: str  # "stamp", "git" or "unknown"

else:
    BuildInfo = collections.namedtuple("BuildInfo", ["version", "commit", "date", "source"])


def _from_git() -> BuildInfo | None:
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(repo, ".git")):
        return None
    try:
        out = subprocess.run(
            ["git", "-C", repo, "log", "-1", "--format=%H %cI"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return BuildInfo(__version__, out[0], out[1], "git") if len(out) == 2 else None


def build_info() -> BuildInfo:
    """The stamp written by scripts/setup.sh, or git's view of this checkout, or just the version."""
    try:
        with open(_STAMP) as f:
            data = json.load(f)
        return BuildInfo(__version__, data.get("commit"), data.get("date"), "stamp")
    except (OSError, ValueError):
        pass
    return _from_git() or BuildInfo(__version__, None, None, "unknown")


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def sources_digest(package: str = _PACKAGE) -> str:
    """A digest of the package's Python sources (names, sizes and modification times: stat only, no reads).

    It changes with any edit, a `git pull` in an editable install, or a reinstall, which a stamped commit alone
    would not show: an install stamp goes stale the moment its checkout moves on.
    """
    import zlib  # a change detector, not a security check: crc32 is enough and costs nothing to import

    crc = 0
    stack = [package]
    while stack:
        with os.scandir(stack.pop()) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                stack.append(entry.path)
            elif entry.name.endswith(".py"):
                st = entry.stat()
                line = f"{entry.path[len(package) :]}\0{st.st_size}\0{st.st_mtime_ns}\n"
                crc = zlib.crc32(line.encode(), crc)
    return f"{crc:08x}"


def code_id() -> str:
    """What identifies the running code across processes: the commit (stamp or git) and the sources' digest.

    CLI and daemon compare it at the handshake; the commit is there for people, the digest for exactness.
    """
    info = build_info() if os.path.exists(_STAMP) else BuildInfo(__version__, None, None, "unknown")
    return f"{(info.commit or 'nogit')[:12]}-{sources_digest()}"
