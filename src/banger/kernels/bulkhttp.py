"""An httpx transport for bulk downloads: httpx's semantics, but 1 MiB socket reads instead of 64 KiB."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, cast

import httpcore
import httpx

BULK_READ = 1 << 20


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process-wide TLS client context (certifi/system CAs), created once."""
    # Loading the CA bundle takes tens of milliseconds; a daemon pays it once, not per pull.
    return httpx.create_ssl_context()


class _BulkStream(httpcore.AsyncNetworkStream):
    """A connection that reads up to BULK_READ bytes per call, whatever smaller size httpcore asks for."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, BULK_READ), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _BulkStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def widen_reads(stream: httpcore.AsyncNetworkStream) -> bool:
    """Let the asyncio transport under an httpcore anyio `stream` take up to BULK_READ per recv; False if it cannot."""
    # asyncio's socket transports recv at most `max_size` (256 KiB) at a time, and each of those chunks is one trip
    # through anyio, httpcore and httpx on the event loop: a quarter of that Python work, which competes for the GIL
    # with the unpacking threads, goes away at 1 MiB. Neither library exposes the transport, so this reaches through
    # their private attributes (anyio's SocketStream keeps it in `_transport`) and changes nothing if they move.
    transport = getattr(getattr(stream, "_stream", None), "_transport", None)
    if not isinstance(transport, asyncio.Transport) or not isinstance(getattr(transport, "max_size", None), int):
        return False
    transport.max_size = max(transport.max_size, BULK_READ)  # type: ignore[attr-defined]
    return True


class _BulkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's asyncio backend with _BulkStream connections."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        widen_reads(stream)  # TLS, if any, is layered over this same transport later
        return _BulkStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        widen_reads(stream)
        return _BulkStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# httpcore errors as the httpx errors the rest of banger expects; the most specific match wins.
_HTTPCORE_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.ProxyError: httpx.ProxyError,
}


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except tuple(_HTTPCORE_ERRORS) as exc:
        mapped = next(_HTTPCORE_ERRORS[c] for c in type(exc).__mro__ if c in _HTTPCORE_ERRORS)
        raise mapped(str(exc) or type(exc).__name__) from exc


class _BulkBody(httpx.AsyncByteStream):
    def __init__(self, inner: AsyncIterable[bytes]) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for part in self._inner:
                yield part

    async def aclose(self) -> None:
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()


class BulkTransport(httpx.AsyncBaseTransport):
    """An httpx transport for large downloads: like httpx's own, but reading 1 MiB per socket read, not 64 KiB.

    Each read is a trip through httpcore, anyio and the event loop; at 64 KiB (httpcore's reads) or 256 KiB
    (asyncio's recv size) that Python work competes for the GIL with the unpacking threads and costs a pull about
    15% against `curl | zstd | tar`. Proxies from the
    environment still go through httpx's own proxy transports (AsyncClient mounts them over this one).
    """

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context, network_backend=_BulkBackend())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` through the pool; the response body streams from the connection."""
        url = httpcore.URL(
            scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path
        )
        core_request = httpcore.Request(
            method=request.method,
            url=url,
            headers=request.headers.raw,
            content=cast(AsyncIterable[bytes], request.stream),
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        body = cast(AsyncIterable[bytes], response.stream)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_BulkBody(body),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
