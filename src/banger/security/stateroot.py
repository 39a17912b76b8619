"""Permissions of the state root: a socket group's members can reach the socket, and nothing else."""

from __future__ import annotations

import logging
import os
import stat

from banger.config import Paths

log = logging.getLogger("banger.security")


def open_to_group(paths: Paths, gid: int | None) -> None:
    """home 0711 (traverse only), run/ 0710 to the group, vms/ and snapshots/ traverse-only for confined VMMs,
    everything else 0700 root's.

    A non-member can then tell that a system daemon exists (stat of the socket fails with EACCES, not
    ENOENT) and is told how to be let in, while the database, logs, images and VM files stay root's alone.
    """
    # The database (and its -wal/-shm, which SQLite creates with the database's mode), config and the state
    # directories sit right under home: keep them the owner's alone whatever umask made them.
    root = os.geteuid() == 0
    # Confined VMMs run as their own uids and reach their VM's directory (theirs) and snapshots (their group's)
    # by path: home, vms/ and snapshots/ are traverse-only for them, never listable (drivers/confine.py).
    traversed = {paths.vms.name, "snapshots"} if root else set()
    for entry in paths.home.iterdir():
        if entry.name == paths.run_dir.name or entry.is_symlink():
            continue
        if entry.name in traversed and entry.is_dir():
            os.chmod(entry, 0o711)
            continue
        mode = entry.stat().st_mode
        if mode & 0o077:
            os.chmod(entry, stat.S_IMODE(mode) & ~0o077)
    os.chmod(paths.home, 0o711 if root else 0o700)
    if gid is None or not root:
        os.chmod(paths.run_dir, 0o700)
        return
    os.chown(paths.run_dir, 0, gid)
    os.chmod(paths.run_dir, 0o710)
    log.info("state root %s open to gid %d (socket only)", paths.home, gid)
