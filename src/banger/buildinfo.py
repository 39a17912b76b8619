"""Version, git commit and build date: stamped at install time, else read from git in a checkout."""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from banger import __version__

_STAMP = Path(__file__).with_name("_buildinfo.json")


@dataclass(frozen=True)
class BuildInfo:
    version: str
    commit: str | None
    date: str | None
    source: str  # "stamp", "git" or "unknown"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _from_git() -> BuildInfo | None:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%H %cI"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) != 2:
        return None
    return BuildInfo(__version__, out[0], out[1], "git")


@functools.cache
def build_info() -> BuildInfo:
    """The stamp written by scripts/setup.sh, or git's view of this checkout, or just the version."""
    try:
        data = json.loads(_STAMP.read_text())
        return BuildInfo(__version__, data.get("commit"), data.get("date"), "stamp")
    except (OSError, ValueError):
        pass
    return _from_git() or BuildInfo(__version__, None, None, "unknown")
