"""Permissions of the state root: a socket group's members can reach the socket, and nothing else."""

from __future__ import annotations

import logging
import os
import stat

from banger.config import Paths

log = logging.getLogger("banger.security")


def open_to_group(paths: Paths, gid: int | None) -> None:
    """home 0711 (traverse only), run/ 0710 to the group, everything else stays 0700 root's.

    A non-member can then tell that a system daemon exists (stat of the socket fails with EACCES, not
    ENOENT) and is told how to be let in, while the database, logs, images and VM files stay root's alone.
    """
    # The database (and its -wal/-shm, which SQLite creates with the database's mode), config and the state
    # directories sit right under home: keep them the owner's alone whatever umask made them.
    for entry in paths.home.iterdir():
        if entry.name != paths.run_dir.name and not entry.is_symlink():
            mode = entry.stat().st_mode
            if mode & 0o077:
                os.chmod(entry, stat.S_IMODE(mode) & ~0o077)
    if gid is None or os.geteuid() != 0:
        os.chmod(paths.home, 0o700)
        os.chmod(paths.run_dir, 0o700)
        return
    os.chmod(paths.home, 0o711)
    os.chown(paths.run_dir, 0, gid)
    os.chmod(paths.run_dir, 0o710)
    log.info("state root %s open to gid %d (socket only)", paths.home, gid)
