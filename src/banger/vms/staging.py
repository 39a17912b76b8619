"""Staging directories the daemon makes next to a host destination (`vm cp` out), recorded before they exist.

A copy out is staged in `.NAME.banger-XXXX` beside its destination and merged from there (guest/transfer.py); a
daemon SIGKILLed mid-copy cannot remove it. Each staging directory is recorded here first, and the next daemon
start removes what a killed one left behind (only directories whose name has the staging shape).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("banger.vms")

_STAGING_NAME = re.compile(r"^\..*\.banger-[A-Za-z0-9_]+$")


class StagingJournal:
    """One record file per staging directory under `root` (the state root's run/staging)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _record(self, path: str) -> Path:
        return self.root / hashlib.sha256(path.encode()).hexdigest()[:32]

    def add(self, path: str) -> None:
        """Record `path` before anything is written into it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = self._record(path)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(path)
        os.replace(tmp, record)

    def remove(self, path: str) -> None:
        """Forget `path` (its owner removed it)."""
        self._record(path).unlink(missing_ok=True)

    def sweep(self) -> None:
        """At daemon start: remove the staging directories a killed daemon left, then their records."""
        if not self.root.is_dir():
            return
        for record in self.root.iterdir():
            try:
                path = record.read_text()
            except OSError:
                path = ""
            if path and _STAGING_NAME.match(os.path.basename(path)) and os.path.isdir(path):
                log.warning("vms: removing %s, left by a copy that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)
            record.unlink(missing_ok=True)
