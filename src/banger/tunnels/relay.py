"""Join a tunnel to a host-side byte stream, both directions at once, half-closes passed on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from banger.guest.tunnelclient import Tunnel

log = logging.getLogger("banger.tunnels")

READ_CHUNK = 65536
# Where the host end of a reverse tunnel comes from: TCP to a loopback port by default, or anything that gives a
# connected pair of streams (the sessions stream plugs in a credential-adding proxy this way).
HostConnector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def tcp_connector(port: int, host: str = "127.0.0.1") -> HostConnector:
    """A HostConnector that opens a TCP connection to host:port."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port)

    return connect


async def _to_guest(reader: asyncio.StreamReader, tunnel: Tunnel) -> None:
    while data := await reader.read(READ_CHUNK):
        await tunnel.write(data)
    await tunnel.write_eof()


async def _to_host(tunnel: Tunnel, writer: asyncio.StreamWriter) -> None:
    while data := await tunnel.read():
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def relay(tunnel: Tunnel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes both ways until both sides have finished; the first failure ends both. Always closes both."""
    tasks = [asyncio.create_task(_to_guest(reader, tunnel)), asyncio.create_task(_to_host(tunnel, writer))]
    clean = False
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    log.debug("tunnel relay ended: %s", task.exception())
                    return
        clean = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if clean:
            await tunnel.finish()  # let the agent deliver our last bytes before the stream goes
        else:
            await tunnel.close()
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
