"""Host side of the agent's TUNNEL, LISTEN, WATCH and SSH requests (see protocol.py and guesttunnel.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from banger.errors import TimeoutError_
from banger.guest.client import AgentClient, _raise_for
from banger.guest.protocol import Fd, Frame, Kind, Stream

CONNECT_TIMEOUT = 15.0
# How long a cleanly finished tunnel waits for the agent to confirm the end before cancelling it.
FINISH_TIMEOUT = 10.0


class Tunnel:
    """One TCP connection in the guest, joined through the agent: read() and write() bytes, with flow control."""

    def __init__(self, client: AgentClient, stream: Stream) -> None:
        self.client = client
        self.stream = stream
        self._unacked = 0
        self._ended = False

    async def _next(self) -> Frame:
        return await self.stream.inbox.get()

    async def read(self) -> bytes:
        """The next bytes from the guest; b"" once the guest side has finished sending (or the tunnel ended).

        The previous chunk is acknowledged only now: asking for more means the caller has passed it on, so a slow
        host-side consumer holds the guest's sender back instead of filling the daemon's memory.
        """
        self.client.mux.ack(self.stream.id, self._unacked)
        self._unacked = 0
        while not self._ended:
            frame = await self._next()
            if frame.kind == Kind.DATA:
                self._unacked = len(frame.payload)
                return frame.payload
            if frame.kind == Kind.EOF:
                return b""
            if frame.kind == Kind.END:
                self._ended = True
                self.client.forget(self.stream)
                if not frame.header.get("ok"):
                    _raise_for(frame.header)
        return b""

    async def write(self, data: bytes) -> None:
        """Send bytes to the guest connection (waits while the agent's window is full)."""
        if not await self.client.mux.send_data(self.stream, Fd.IN, data):
            raise ConnectionResetError("the tunnel closed")

    async def write_eof(self) -> None:
        """No more bytes from the host side (the guest socket sees a half-close)."""
        if not self._ended:
            await self.client.mux.send(Kind.EOF, self.stream.id, fd=int(Fd.IN))

    async def finish(self, timeout: float = FINISH_TIMEOUT) -> None:
        """Both directions have half-closed: wait for the agent to end the stream, then it has written everything
        the host sent into the guest socket. Ending it at once instead (`close`) would cancel the agent's handler
        while our last bytes may still wait in its queue. Cancels only if the agent does not end it in `timeout`."""
        self.client.mux.ack(self.stream.id, self._unacked)
        self._unacked = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self._ended:
                    frame = await self._next()
                    if frame.kind == Kind.END:
                        self._ended = True
                        self.client.forget(self.stream)
        await self.close()

    async def close(self) -> None:
        """End the tunnel (the agent closes the guest connection)."""
        if not self._ended:
            self._ended = True
            with contextlib.suppress(OSError, ConnectionError):
                await self.client.cancel_stream(self.stream)
            self.client.forget(self.stream)


async def _first_event(client: AgentClient, stream: Stream, timeout: float, what: str) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout):
            frame = await stream.inbox.get()
    except TimeoutError:
        await client.cancel_stream(stream)
        client.forget(stream)
        raise TimeoutError_(f"guest agent did not answer {what}") from None
    if frame.kind == Kind.END:
        client.forget(stream)
        if not frame.header.get("ok"):
            _raise_for(frame.header)
        raise ConnectionResetError(f"{what} ended at once")
    return frame.header


async def open_tunnel(
    client: AgentClient, *, port: int | None = None, accept: int | None = None, timeout: float = CONNECT_TIMEOUT
) -> Tunnel:
    """Connect to guest 127.0.0.1:port (or claim accepted connection `accept` of a listen()); raises if refused."""
    fields: dict[str, Any] = {"port": port} if accept is None else {"accept": accept}
    stream = await client.open_stream(Kind.TUNNEL, **fields)
    try:
        await _first_event(client, stream, timeout, f"tunnel to guest port {port}")
    except BaseException:
        client.forget(stream)
        raise
    return Tunnel(client, stream)


@dataclass
class Listener:
    """A LISTEN stream: the agent listens on a guest port; `accepted()` yields connection ids to claim."""

    client: AgentClient
    stream: Stream

    async def accepted(self) -> AsyncIterator[int]:
        """Each connection the guest side accepted, until the stream ends (raises on an agent error)."""
        while True:
            frame = await self.stream.inbox.get()
            if frame.kind == Kind.END:
                self.client.forget(self.stream)
                if not frame.header.get("ok"):
                    _raise_for(frame.header)
                return
            if frame.kind == Kind.EVENT and isinstance(frame.header.get("accepted"), int):
                yield int(frame.header["accepted"])

    async def close(self) -> None:
        """Stop listening in the guest."""
        with contextlib.suppress(OSError, ConnectionError):
            await self.client.cancel_stream(self.stream)
        self.client.forget(self.stream)


async def listen(client: AgentClient, port: int, timeout: float = CONNECT_TIMEOUT) -> Listener:
    """Have the agent listen on guest 127.0.0.1:port; returns once it does (raises if the port is taken)."""
    stream = await client.open_stream(Kind.LISTEN, port=port)
    await _first_event(client, stream, timeout, f"listen on guest port {port}")
    return Listener(client, stream)


async def watch_ports(client: AgentClient, interval: float = 0.5) -> AsyncIterator[list[int]]:
    """The guest's listening TCP ports, now and after every change, until the connection drops."""
    stream = await client.open_stream(Kind.WATCH, interval=interval)
    try:
        while True:
            frame = await stream.inbox.get()
            if frame.kind == Kind.END:
                if not frame.header.get("ok"):
                    _raise_for(frame.header)
                return
            if frame.kind == Kind.EVENT and isinstance(frame.header.get("ports"), list):
                yield [int(p) for p in frame.header["ports"] if isinstance(p, int)][:65536]
    finally:
        with contextlib.suppress(OSError, ConnectionError):
            await client.cancel_stream(stream)
        client.forget(stream)


@dataclass(frozen=True)
class SshInfo:
    """What the guest said about SSH: whether it has a server, and its public host keys ("type base64")."""

    sshd: bool
    host_keys: tuple[str, ...]


async def ssh_setup(client: AgentClient, keys: list[str], user: str = "root", timeout: float = 90.0) -> SshInfo:
    """Authorize `keys` for `user`, make host keys if missing and start sshd; report the host keys."""
    reply = await client.call(Kind.SSH, timeout, keys=keys, user=user)
    host_keys = tuple(str(k)[:16384] for k in (reply.get("host_keys") or [])[:16] if isinstance(k, str))
    return SshInfo(bool(reply.get("sshd")), host_keys)
