"""SSH host keys for a clone, made on the host.

A clone must not keep its snapshot's host keys. Under TCG `ssh-keygen -A` in the guest takes seconds (RSA above
all, and its time varies with the prime search), which made it most of a clone's start; natively it takes a few
tenths of a second. The daemon makes the keys while QEMU loads the saved machine and hands them to the guest with
the rest of its identity (guest/reidentify.py writes them); a host without ssh-keygen leaves it to the guest.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from banger import proc
from banger.guest.reidentify import KEY_TYPES  # the types the guest writes: what `ssh-keygen -A` makes

KEYGEN_TIMEOUT = 60.0


def make_host_keys(comment: str) -> dict[str, dict[str, str]] | None:
    """{type: {"private": PEM text, "public": one line}} for each of KEY_TYPES (at ssh-keygen's default sizes);
    None without ssh-keygen."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        return None
    keys: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="banger-hostkeys-") as tmp:  # mode 0700: only root reads the keys
        for kind in KEY_TYPES:
            path = Path(tmp) / f"ssh_host_{kind}_key"
            argv = [keygen, "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
            proc.run(argv, step=f"make an SSH host key ({kind})", timeout=KEYGEN_TIMEOUT)
            keys[kind] = {
                "private": path.read_text(),
                "public": path.with_name(path.name + ".pub").read_text().strip(),
            }
    return keys
