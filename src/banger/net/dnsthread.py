"""Runs the guests' DnsServer on its own event loop in a dedicated thread, optionally inside a network namespace.

Why a thread: the server must bind the bridge address, which exists only in the namespace holding the bridge.
A socket stays in the namespace it was created in, and `setns(CLONE_NEWNET)` switches only the calling
thread, so a dedicated thread that enters the namespace and never leaves it can serve DNS there while the
daemon's own loop stays in the root namespace. In production (no namespace) the same thread keeps DNS answers
independent of slow work on the daemon's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import os
import threading
from collections.abc import Mapping
from ipaddress import IPv4Address

from banger.errors import NotFoundError, ToolError
from banger.net.dns import DnsServer
from banger.net.links import NETNS_RUN_DIR

log = logging.getLogger("banger.net.dns")

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling thread into the named network namespace (for good: use a dedicated thread)."""
    path = NETNS_RUN_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFoundError(f"network namespace {name!r} does not exist") from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ToolError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


class DnsThread:
    """A started DnsServer living on a private loop; records are changed from any thread."""

    def __init__(self, server: DnsServer, netns: str | None = None) -> None:
        self.server = server
        self.netns = netns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Start the thread and return once the server's sockets are bound (or raise why they are not)."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="banger-dns", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            if self.netns is not None:
                enter_netns(self.netns)
            loop = asyncio.new_event_loop()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as exc:
            loop.close()
            ready.set_exception(exc)
            return
        self._loop = loop
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.server.stop())
            loop.close()

    @property
    def running(self) -> bool:
        """Whether the server is up."""
        return self._thread is not None and self._thread.is_alive()

    def set_records(self, records: Mapping[str, IPv4Address]) -> None:
        """Replace the server's name table; queries answered after this call see it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.server.set_records, dict(records))
        except RuntimeError:
            log.debug("dns: record update after the server loop closed, dropped")

    async def stop(self) -> None:
        """Close the server's sockets and end the thread."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        # Stopping run_forever makes the thread's finally close the sockets on their own loop.
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
