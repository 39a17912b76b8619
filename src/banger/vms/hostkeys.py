"""SSH host keys for a clone, made on the host.

A clone must not keep its snapshot's host keys. Under TCG `ssh-keygen -A` in the guest takes seconds (RSA above
all, and its time varies with the prime search), which made it most of a clone's start; natively it takes a few
tenths of a second. The daemon makes the keys while QEMU loads the saved machine and hands them to the guest with
the rest of its identity (guest/reidentify.py writes them); a host without ssh-keygen leaves it to the guest.

Even on the host an RSA key takes 0.1-0.5 s, longer than QEMU takes to load a saved machine, so the daemon keeps
a few sets made ahead (`HostKeyPool`, in memory only, each set handed out once) once clones are being made.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from banger import proc
from banger.aio import in_thread
from banger.guest.reidentify import KEY_TYPES  # the types the guest writes: what `ssh-keygen -A` makes

KEYGEN_TIMEOUT = 60.0
POOL_SIZE = 2  # key sets made ahead, once a first clone asked for one
POOL_COMMENT = "root@banger-clone"  # the private keys' comment; each public key gets its VM's name (cosmetic)

log = logging.getLogger(__name__)

Keys = dict[str, dict[str, str]]


def make_host_keys(comment: str) -> Keys | None:
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


def _renamed(keys: Keys, comment: str) -> Keys:
    """The same keys with `comment` on each public key line ("TYPE BASE64 COMMENT")."""
    return {kind: {**pair, "public": " ".join([*pair["public"].split()[:2], comment])} for kind, pair in keys.items()}


class HostKeyPool:
    """Host key sets for clones, made ahead: `take` hands out a ready set (or makes one then and there), `refill`
    makes up to POOL_SIZE more in the background. Sets live in this process's memory only and go out once each.
    Nothing is made before the first clone: daemons that never clone never pay for it."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self.size = size
        self._ready: list[Keys] = []
        self._filling: asyncio.Task[None] | None = None

    async def take(self, comment: str) -> Keys | None:
        """A fresh set of keys with `comment` on the public keys; None without ssh-keygen."""
        keys = self._ready.pop() if self._ready else await in_thread(make_host_keys, POOL_COMMENT)
        return None if keys is None else _renamed(keys, comment)

    def refill(self) -> None:
        """Make sets up to the pool's size in the background (after a clone is up: not while it starts)."""
        if self._filling is None or self._filling.done():
            self._filling = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        try:
            while len(self._ready) < self.size:
                keys = await in_thread(make_host_keys, POOL_COMMENT)
                if keys is None:
                    return
                self._ready.append(keys)
        except Exception as exc:  # clones then make their keys when they need them, as without a pool
            log.warning("making SSH host keys ahead failed: %s", exc)

    async def close(self) -> None:
        if self._filling is not None:
            self._filling.cancel()
            await asyncio.gather(self._filling, return_exceptions=True)
        self._ready.clear()
