"""Connecting to QEMU's monitor (QMP), with a retry for a handshake that fails before any command ran."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from qemu.qmp import ConnectError, QMPClient, QMPError

log = logging.getLogger(__name__)

# A QMP handshake (greeting, then qmp_capabilities) that fails is retried this many times in all, with a short
# pause: seen once on a host running several TCG guests, where the capabilities reply did not come back as one.
# Nothing has run on the monitor yet at that point, so a retry is safe.
CONNECT_ATTEMPTS = 3
RETRY_PAUSE = 0.2


async def connect(name: str, socket_path: str) -> QMPClient:
    """A client connected to the QMP socket at `socket_path` and past capabilities negotiation.

    The caller bounds the time (process.deadline) and disconnects the client. Raises QMPError or OSError when
    every attempt failed (the last attempt's error).
    """
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        client = QMPClient(name)
        try:
            await client.connect(socket_path)
            return client
        except ConnectError as exc:
            with contextlib.suppress(QMPError, OSError):
                await client.disconnect()
            if attempt == CONNECT_ATTEMPTS:
                raise
            log.warning("QMP handshake on %s failed (%s); trying again", socket_path, exc)
            await asyncio.sleep(RETRY_PAUSE)
    raise AssertionError("unreachable")
