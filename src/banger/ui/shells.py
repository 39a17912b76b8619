"""Terminal shells that no page is attached to: each is ended after a grace period unless a page attaches again.

A UI shell is a guest session (`shell-…`), so it outlives its page: a reload within the grace period finds it
running and reattaches (the screen replays). A tab closed for good would otherwise leave its shell in
`session ls` until the VM stops; the UI ends it once `grace` seconds pass with no page attached. Shells that
pages of another UI process attach to are not this process's to count: each UI reaps what it saw detach.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from banger.errors import BangerError
from banger.rpc.aclient import AsyncClient

log = logging.getLogger("banger.ui")

DEFAULT_GRACE = 600.0


class DetachedShells:
    """Counts the pages attached to each shell; ends a shell `grace` seconds after its last page left."""

    def __init__(self, socket: Path, grace: float) -> None:
        self.socket = socket
        self.grace = grace
        self._pages: dict[tuple[str, str], int] = {}
        self._reapers: dict[tuple[str, str], asyncio.Task[None]] = {}

    def attached(self, vm: str, name: str) -> None:
        key = (vm, name)
        self._pages[key] = self._pages.get(key, 0) + 1
        if (reaper := self._reapers.pop(key, None)) is not None:
            reaper.cancel()

    def detached(self, vm: str, name: str) -> None:
        key = (vm, name)
        left = self._pages.get(key, 1) - 1
        if left > 0:
            self._pages[key] = left
            return
        self._pages.pop(key, None)
        if self.grace > 0 and key not in self._reapers:
            self._reapers[key] = asyncio.get_running_loop().create_task(self._reap(key))

    def ended(self, vm: str, name: str) -> None:
        """The shell is gone (it exited, or a page replaced it): nothing to wait for."""
        if (reaper := self._reapers.pop((vm, name), None)) is not None:
            reaper.cancel()

    async def _reap(self, key: tuple[str, str]) -> None:
        vm, name = key
        try:
            await asyncio.sleep(self.grace)
            if self._pages.get(key):
                return
            async with AsyncClient(self.socket) as client:
                await client.call("session.rm", {"vm": vm, "session": name, "force": True})
            log.info("ended shell %s on %s: no page attached for %.0fs", name, vm, self.grace)
        except (BangerError, OSError) as exc:  # the VM or the session went away, or the daemon is not there
            log.debug("shell %s on %s: %s", name, vm, exc)
        finally:
            if self._reapers.get(key) is asyncio.current_task():
                del self._reapers[key]

    async def close(self) -> None:
        """Cancel pending reapers (the UI is stopping; its shells stay, as sessions do)."""
        reapers = list(self._reapers.values())
        for reaper in reapers:
            reaper.cancel()
        for reaper in reapers:
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
