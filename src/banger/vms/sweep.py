"""At daemon start: remove what a killed daemon left behind.

A `vm create` killed before its row was written leaves a VM directory (and maybe a run directory) with no row; a
create or start killed mid-way leaves temporary files (`*.tmp`: a half-cloned root disk, a half-built seed drive)
inside a VM directory. The daemon holds its lock while this runs, so nothing of it is in progress.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("banger.vms")

# VM ids are secrets.token_hex(6); anything else under these directories is not ours to judge.
_VM_ID = re.compile(r"[0-9a-f]{12}")


def orphans(roots: Iterable[Path], known_ids: set[str]) -> list[Path]:
    """Per-VM directories under `roots` whose VM has no row."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and _VM_ID.fullmatch(entry.name):
                if entry.name not in known_ids:
                    found.append(entry)
    return found


def remove_orphans(roots: Iterable[Path], known_ids: set[str]) -> None:
    """Delete every orphan directory (the daemon holds its lock: no create is under way)."""
    for path in orphans(roots, known_ids):
        log.warning("vms: removing %s, left by a create that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temps(vm_dirs: Iterable[Path]) -> None:
    """Delete the `*.tmp` files and directories inside VM directories (VM directories are banger's alone)."""
    for vdir in vm_dirs:
        if not vdir.is_dir():
            continue
        for entry in vdir.iterdir():
            if not entry.name.endswith(".tmp"):
                continue
            log.warning("vms: removing %s, left by an operation that did not finish", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
