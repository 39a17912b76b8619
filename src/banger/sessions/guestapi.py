"""Typed host-side calls for the agent's session requests (see guest/session_agent.py)."""

from __future__ import annotations

import base64
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from banger.errors import BangerError
from banger.guest.client import AgentClient, raise_for
from banger.guest.protocol import Kind

# Chunk sink: (logical offset of the first byte, bytes). May be async: the stream is acknowledged after it returns.
ChunkSink = Callable[[int, bytes], Awaitable[None] | None]
MAX_INPUT_CHUNK = 16 * 1024


@dataclass(frozen=True)
class GuestSession:
    """A session as the guest reports it."""

    name: str
    kind: str
    command: list[str]
    tty: bool
    restart: str
    state: str
    exit_code: int | None
    signal: int | None
    started_at: float | None
    ended_at: float | None
    output_bytes: int
    restarts: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GuestSession:
        def num(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, int | float) else None

        def opt_int(key: str) -> int | None:
            v = d.get(key)
            return int(v) if isinstance(v, int) else None

        return cls(
            name=str(d["name"]),
            kind=str(d.get("kind", "process")),
            command=[str(a) for a in d.get("command") or []],
            tty=bool(d.get("tty")),
            restart=str(d.get("restart", "no")),
            state=str(d.get("state", "lost")),
            exit_code=opt_int("exit_code"),
            signal=opt_int("signal"),
            started_at=num("started_at"),
            ended_at=num("ended_at"),
            output_bytes=int(d.get("output_bytes") or 0),
            restarts=int(d.get("restarts") or 0),
        )


async def start(
    client: AgentClient,
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    user: str | None,
    tty: bool,
    rows: int,
    cols: int,
    restart: str,
    log_max_bytes: int,
    kind: str = "process",
) -> GuestSession:
    """Start a supervised session in the guest."""
    reply = await client.request(
        Kind.SESSION_START,
        240.0,
        name=name,
        argv=argv,
        env=env,
        cwd=cwd,
        user=user,
        tty=tty,
        rows=rows,
        cols=cols,
        restart=restart,
        log_max_bytes=log_max_bytes,
        session_kind=kind,
    )
    return GuestSession.from_json(reply["session"])


async def list_(client: AgentClient) -> list[GuestSession]:
    """Every session the guest has."""
    reply = await client.request(Kind.SESSION_LIST, 60.0)
    return [GuestSession.from_json(s) for s in reply.get("sessions") or []]


async def read(client: AgentClient, name: str, offset: int, *, follow: bool, sink: ChunkSink) -> GuestSession:
    """Stream a session's output from `offset` into `sink`; with follow until the session ends."""
    stream = await client.open_stream(Kind.SESSION_READ, name=name, offset=offset, follow=follow)
    try:
        while True:
            frame = await stream.inbox.get()
            if frame.kind == Kind.DATA:
                off = frame.header.get("off")
                if not isinstance(off, int):
                    raise BangerError("guest agent sent session output without an offset")
                result = sink(off, frame.payload)
                if inspect.isawaitable(result):
                    await result
                client.mux.ack(stream.id, len(frame.payload))  # only once the sink has the bytes
            elif frame.kind == Kind.END:
                if not frame.header.get("ok"):
                    raise_for(frame.header)
                return GuestSession.from_json(frame.header["session"])
    except BaseException:
        if stream.id in client.mux.streams:
            await client.cancel_stream(stream)
        raise
    finally:
        client.forget(stream)


async def control(client: AgentClient, name: str, op: str, wait: float = 60.0, **fields: Any) -> GuestSession:
    """One control operation (input, resize, signal, stop) on a running session, answered within `wait` s."""
    reply = await client.request(Kind.SESSION_CTL, wait, name=name, op=op, **fields)
    return GuestSession.from_json(reply["session"])


async def send_input(client: AgentClient, name: str, data: bytes, *, eof: bool) -> None:
    """Write bytes to a session's stdin (in chunks), then optionally close it."""
    chunks = [data[i : i + MAX_INPUT_CHUNK] for i in range(0, len(data), MAX_INPUT_CHUNK)] or [b""]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        await control(client, name, "input", data=base64.b64encode(chunk).decode(), eof=eof and last)


async def remove(client: AgentClient, name: str, *, force: bool) -> None:
    """Delete a session in the guest (a running one only with force)."""
    await client.request(Kind.SESSION_RM, 60.0, name=name, force=force)
