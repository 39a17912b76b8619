"""An asyncio RPC client for long-lived callers (the web UI): many calls on one connection, streams as iterators.

It speaks the same protocol as the CLI's synchronous `Client` and raises the same errors (`Client.result_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from banger import PROTOCOL_VERSION, __version__
from banger.errors import DaemonError, ErrorCode, UnsupportedError
from banger.rpc import protocol
from banger.rpc.client import Client, DaemonUnavailable

# Notifications waiting for a slow stream reader; beyond this the connection stops reading (backpressure).
STREAM_BACKLOG = 256


class _Call:
    """One outstanding call: its reply future and the notifications that arrived for it."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.notes: asyncio.Queue[dict[str, Any]] = asyncio.Queue(STREAM_BACKLOG)


class AsyncClient:
    """A connection to bangerd; use as `async with`."""

    def __init__(self, path: Path, *, connect_timeout: float = 5.0) -> None:
        self.path = path
        self._connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._calls: dict[int, _Call] = {}
        self._next_id = 0
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect and perform the version handshake."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=protocol.MAX_LINE), self._connect_timeout
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnavailable(
                f"the banger daemon is not running (socket {self.path})", hint="start it with `banger daemon start`"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise DaemonUnavailable(f"cannot connect to the daemon at {self.path}: {exc}") from exc
        self._pump = asyncio.create_task(self._read_loop(), name="rpc-client-reader")
        await self.call(protocol.HELLO, {"version": __version__, "protocol": PROTOCOL_VERSION})

    async def close(self) -> None:
        """Close the connection; the daemon cancels whatever calls were still running."""
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.wait([self._pump])  # unlike awaiting it, never swallows our own cancellation
            self._pump = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
            self._writer = None
        self._fail_all(DaemonError("the connection to the daemon was closed"))

    def _fail_all(self, exc: BaseException) -> None:
        for call in self._calls.values():
            if not call.reply.done():
                call.reply.set_exception(exc)
            if call.notes.full():  # the stream is over: its reader needs the marker more than the oldest item
                call.notes.get_nowait()
            call.notes.put_nowait({"closed": True})
        self._calls.clear()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "method" in msg:
                    params = msg.get("params") or {}
                    call = self._calls.get(params.get("id"))  # type: ignore[arg-type]
                    if call is not None:
                        # A full queue stops this reader, so the daemon's writes back up (its own bound applies):
                        # a slow browser slows the stream instead of growing a buffer here.
                        await call.notes.put(params)
                    continue
                # The entry stays until `reply` collects it: a stream reader asks for the result after its events.
                call = self._calls.get(msg.get("id"))
                if call is not None and not call.reply.done():
                    call.reply.set_result(msg)
                    await call.notes.put({"done": True})
        except (OSError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        self._fail_all(DaemonError("the daemon closed the connection unexpectedly (see `banger daemon logs`)"))

    def notify(self, method: str, params: dict[str, Any]) -> None:
        """Send a notification (no reply)."""
        if self._writer is None or self._writer.is_closing():
            raise DaemonError("not connected to the daemon")
        self._writer.write(protocol.request(method, params, None))

    def start(self, method: str, params: dict[str, Any] | None = None) -> int:
        """Send a call without waiting for it; returns its id (see `reply` and `notifications`)."""
        if self._writer is None or self._writer.is_closing():
            raise DaemonError("not connected to the daemon")
        self._next_id += 1
        rid = self._next_id
        self._calls[rid] = _Call(method)
        self._writer.write(protocol.request(method, params or {}, rid))
        return rid

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call `method` and return its result (or raise its error); cancelling this cancels the call."""
        rid = self.start(method, params)
        return await self.reply(rid)

    async def reply(self, rid: int) -> Any:
        """Wait for call `rid`'s result; cancelling the wait cancels the call in the daemon."""
        call = self._calls.get(rid)
        if call is None:
            raise DaemonError(f"no call {rid} is running")
        try:
            msg = await asyncio.shield(call.reply)
        except asyncio.CancelledError:
            if not call.reply.done():
                with contextlib.suppress(DaemonError, OSError):
                    self.notify(protocol.CANCEL, {"id": rid})
            raise
        finally:
            self._calls.pop(rid, None)
        if msg.get("error", {}).get("code") == ErrorCode.METHOD_NOT_FOUND:
            raise UnsupportedError(
                f"{call.method} is not supported by this daemon", hint="this daemon is older than the caller"
            )
        return Client.result_of(msg)

    async def notifications(self, rid: int) -> AsyncIterator[dict[str, Any]]:
        """The `$/event` and `$/progress` params of call `rid` as they come, until its reply arrives."""
        call = self._calls.get(rid)
        if call is None:
            return
        while True:
            note = await call.notes.get()
            if "done" in note or "closed" in note:
                return
            yield note
