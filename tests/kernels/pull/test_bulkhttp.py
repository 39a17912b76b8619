"""The bulk httpx transport on a real loopback connection: socket reads larger than asyncio's 256 KiB."""

from __future__ import annotations

import asyncio
import os

import httpx

from banger.kernels.bulkhttp import BULK_READ, BulkTransport, tls_context
from tests.kernels.pull.conftest import LoopbackServer, Route


async def _chunk_sizes(url: str) -> list[int]:
    sizes: list[int] = []
    async with httpx.AsyncClient(transport=BulkTransport(tls_context())) as client:
        async with client.stream("GET", url) as resp:
            async for chunk in resp.aiter_raw():
                sizes.append(len(chunk))
                await asyncio.sleep(0.002)  # a consumer slower than loopback, as the unpacking threads are
    return sizes


def test_reads_take_up_to_a_mebibyte(http_server: LoopbackServer) -> None:
    body = os.urandom(16 << 20)
    sizes = asyncio.run(_chunk_sizes(http_server.add("/big", Route(body=body))))
    assert sum(sizes) == len(body)
    # asyncio's transports recv at most 256 KiB unless the transport's max_size was raised.
    assert 256 << 10 < max(sizes) <= BULK_READ
