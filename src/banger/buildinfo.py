"""Version, git commit and build date: stamped at install time, else read from git in a checkout.

Kept import-light (no dataclasses, subprocess only on the fallback): `banger version` runs through here.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from banger import __version__

_STAMP = os.path.join(os.path.dirname(__file__), "_buildinfo.json")


class BuildInfo(NamedTuple):
    version: str
    commit: str | None
    date: str | None
    source: str  # "stamp", "git" or "unknown"


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
