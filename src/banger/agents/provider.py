"""The model provider of agent VMs: an OpenAI-compatible API chosen on the host, whose key never enters the guest.

The CLI reads `[agent]` from config.toml and BANGER_AGENT_BASE_URL / BANGER_AGENT_MODEL / BANGER_AGENT_API_KEY
(or the variable `api_key_env` names) and sends them with the call. The daemon runs a CredentialProxy per agent
VM: plain HTTP that accepts requests under a random path token, forwards them to the provider's base URL with
`Authorization: Bearer <key>` added, and streams the answer back (server-sent events included). opencode in the
guest is configured with the proxy's URL only. How the guest reaches the proxy is `guest_base_url()`: a reverse
tunnel (guest 127.0.0.1:PORT -> this proxy, served in-process through `connect()`), with or without a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx

from banger.errors import InvalidInputError

log = logging.getLogger("banger.agents")

MAX_HEAD = 64 * 1024
MAX_BODY = 32 << 20
# Not forwarded in either direction: per-connection headers, and the ones the proxy sets itself.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_DROP_REQUEST = _HOP | {"host", "authorization", "content-length"}
_DROP_RESPONSE = _HOP | {"content-length", "content-encoding"}


@dataclass(frozen=True)
class Provider:
    """An OpenAI-compatible API: base URL (…/v1), model name, and the key (never shown)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> Provider | None:
        """From the CLI's `provider` call parameter (None when no provider was configured)."""
        if not params or not params.get("base_url"):
            return None
        url = str(params["base_url"])
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"agent base_url must be an http(s) URL, got {url!r}")
        if not params.get("model"):
            raise InvalidInputError("agent model is not set", hint="set [agent] model or BANGER_AGENT_MODEL")
        key = params.get("api_key")
        return cls(url.rstrip("/"), str(params["model"]), str(key) if key else None)


class CredentialProxy:
    """Forwards HTTP requests under /<token>/ to the provider, adding its credentials; one per agent VM."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.token = secrets.token_urlsafe(18)
        self._server: asyncio.Server | None = None
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=600.0))
        self.address: tuple[str, int] | None = None
        self._served: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        """Listen on host:port (0: any free port); returns the bound address."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        sock = self._server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        return self.address

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection served by this proxy in-process (a socket pair): the host end of the VM's reverse tunnel,
        so the proxy needs no listening socket that other local users could reach."""
        ours, theirs = socket.socketpair()
        try:
            reader, writer = await asyncio.open_connection(sock=ours, limit=MAX_HEAD)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._served.add(task)
        task.add_done_callback(self._served.discard)
        return await asyncio.open_connection(sock=theirs)

    def url_for(self, host: str, port: int) -> str:
        """The base URL a client reaching this proxy at host:port uses (it carries the token, not the key)."""
        return f"http://{host}:{port}/{self.token}"

    async def close(self) -> None:
        """Stop listening and close the upstream client."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._served):
            task.cancel()
        await asyncio.gather(*self._served, return_exceptions=True)
        await self._client.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except httpx.HTTPError as exc:
            log.info("agent provider proxy: upstream failed: %s", exc)
            with contextlib.suppress(ConnectionError):
                await _reply(writer, 502, b"upstream request failed\n")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers: list[tuple[str, str]] = []
        length = 0
        for line in header_lines:
            if not line:
                continue
            name, _, value = line.partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() == "content-length":
                length = int(value)
            if name.lower() == "transfer-encoding":
                await _reply(writer, 411, b"chunked requests are not supported\n")
                return
            if name.lower() not in _DROP_REQUEST:
                headers.append((name, value))
        prefix = f"/{self.token}"
        if not (target == prefix or target.startswith(prefix + "/")):
            await _reply(writer, 403, b"forbidden\n")
            return
        if length > MAX_BODY:
            await _reply(writer, 413, b"request too large\n")
            return
        body = await reader.readexactly(length) if length else b""
        if self.provider.api_key:
            headers.append(("Authorization", f"Bearer {self.provider.api_key}"))
        url = self.provider.base_url + target[len(prefix) :]
        request = self._client.build_request(method, url, headers=headers, content=body)
        response = await self._client.send(request, stream=True)
        try:
            out = [f"HTTP/1.1 {response.status_code} {response.reason_phrase}"]
            out += [f"{k}: {v}" for k, v in response.headers.items() if k.lower() not in _DROP_RESPONSE]
            out += ["Transfer-Encoding: chunked", "Connection: close", "", ""]
            writer.write("\r\n".join(out).encode("latin-1"))
            async for chunk in response.aiter_raw():  # streamed as it comes: SSE must not be buffered
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            await response.aclose()


async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    reason = {403: "Forbidden", 411: "Length Required", 413: "Payload Too Large", 502: "Bad Gateway"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
