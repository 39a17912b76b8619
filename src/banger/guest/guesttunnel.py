"""Guest side of TCP tunnels, reverse listeners and the port watch (stdlib only: ships on the seed drive).

A TUNNEL stream is one TCP connection: to 127.0.0.1:PORT in the guest, or one a LISTEN stream accepted. Bytes go
both ways as DATA frames under the stream's own credit (protocol.py), so a slow peer stalls only its tunnel.
Accepted connections wait in PENDING until the host claims them with TUNNEL {accept}; the LISTEN stream that
accepted them closes the ones never claimed when it ends (or after CLAIM_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING or __package__:
    from banger.guest import ports
    from banger.guest.protocol import Fd, Frame, Kind, Mux, Stream
else:  # run from the seed drive, where the guest modules are plain siblings
    import ports
    from protocol import Fd, Frame, Kind, Mux, Stream

CONNECT_TIMEOUT = 10.0
CLAIM_TIMEOUT = 30.0
READ_CHUNK = 65536
WATCH_INTERVAL = 0.5
# A port watch polls at the host's interval while the guest is in use (a request in flight, or one within
# ACTIVE_WINDOW seconds) and every IDLE_WATCH_INTERVAL seconds otherwise: an idle VM then costs its host next to
# no CPU. A new request moves every watch to the fast interval at once. New listeners mostly come from what
# requests start.
ACTIVE_WINDOW = 30.0
IDLE_WATCH_INTERVAL = 5.0

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
PENDING: dict[int, Conn] = {}
_conn_ids = itertools.count(1)


class Activity:
    """Whether the agent is in use: requests in flight and when the last one started or ended."""

    def __init__(self) -> None:
        self.busy = 0
        self.last = time.monotonic()
        self.wakers: set[asyncio.Event] = set()

    def started(self) -> None:
        self.busy += 1
        self.last = time.monotonic()
        for event in self.wakers:
            event.set()

    def ended(self) -> None:
        self.busy -= 1
        self.last = time.monotonic()

    def idle(self) -> bool:
        return self.busy == 0 and time.monotonic() - self.last > ACTIVE_WINDOW


ACTIVITY = Activity()


class HasMux(Protocol):
    """What the handlers need of the agent's session."""

    mux: Mux


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"port {value!r} is not a number in 1-65535")
    return value


async def _connect(port: int) -> Conn:
    last: OSError | None = None
    # A server bound to ::1 only is still "localhost" to its user; try it when 127.0.0.1 refuses.
    for host in ("127.0.0.1", "::1"):
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await asyncio.open_connection(host, port)
        except OSError as exc:
            last = exc
        except TimeoutError:
            raise ConnectionError(f"connecting to guest port {port} timed out") from None
    raise ConnectionError(f"nothing accepts connections on guest port {port} ({last})")


async def handle_tunnel(session: HasMux, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Join the stream to a TCP connection in the guest until both directions have ended."""
    if frame.header.get("accept") is not None:
        conn = PENDING.pop(int(frame.header["accept"]), None)
        if conn is None:
            raise KeyError(f"no pending connection {frame.header['accept']}")
    else:
        conn = await _connect(_port(frame.header.get("port")))
    reader, writer = conn
    mux = session.mux
    try:
        await mux.send(Kind.EVENT, stream.id, connected=True)
        up = asyncio.create_task(_upstream(mux, stream, reader))
        down = asyncio.create_task(_downstream(mux, stream, writer))
        try:
            await asyncio.gather(up, down)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
    return {}


async def _upstream(mux: Mux, stream: Stream, reader: asyncio.StreamReader) -> None:
    while data := await reader.read(READ_CHUNK):
        if not await mux.send_data(stream, Fd.OUT, data):
            return
    await mux.send(Kind.EOF, stream.id, fd=int(Fd.OUT))


async def _downstream(mux: Mux, stream: Stream, writer: asyncio.StreamWriter) -> None:
    while True:
        frame = await stream.inbox.get()
        if frame.kind == Kind.DATA:
            writer.write(frame.payload)
            await writer.drain()
            mux.ack(stream.id, len(frame.payload))  # only once the socket took it: the host's window is ours
        elif frame.kind == Kind.EOF:
            if writer.can_write_eof():
                writer.write_eof()
            return
        elif frame.kind == Kind.END:
            return


async def handle_listen(session: HasMux, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Listen on guest 127.0.0.1:port and announce each connection for the host to claim (runs until cancelled)."""
    port = _port(frame.header.get("port"))
    mine: set[int] = set()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(_conn_ids)
        PENDING[conn_id] = (reader, writer)
        mine.add(conn_id)
        asyncio.get_running_loop().call_later(CLAIM_TIMEOUT, _expire, conn_id)
        await session.mux.send(Kind.EVENT, stream.id, accepted=conn_id)

    try:
        server = await asyncio.start_server(on_conn, "127.0.0.1", port)
    except OSError as exc:
        raise ValueError(f"cannot listen on guest port {port}: {exc.strerror}") from exc
    try:
        await session.mux.send(Kind.EVENT, stream.id, listening=port)
        async with server:
            await server.serve_forever()
    finally:
        for conn_id in mine:
            _expire(conn_id)
    return {}


def _expire(conn_id: int) -> None:
    conn = PENDING.pop(conn_id, None)
    if conn is not None:
        conn[1].close()


def tcp_listeners(proc_net: str = "/proc/net") -> list[int]:
    """Sorted TCP ports something listens on (any address), from /proc/net/tcp{,6} only: cheap to poll."""
    found: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc_net}/{name}") as f:
                found.update(p.port for p in ports.parse_proc_net(f.read(), name))
        except OSError:
            continue
    return sorted(found)


async def handle_watch(session: HasMux, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Send the listening TCP ports now and whenever they change (runs until cancelled)."""
    interval = max(0.1, float(frame.header.get("interval") or WATCH_INTERVAL))
    last: list[int] | None = None
    wake = asyncio.Event()
    ACTIVITY.wakers.add(wake)
    poll = True
    try:
        while True:
            wake.clear()
            if poll:
                # Read in the loop, not in a thread: two small procfs reads cost less than a hop to a worker thread.
                current = tcp_listeners()
                if current != last:
                    await session.mux.send(Kind.EVENT, stream.id, ports=current)
                    last = current
            try:
                await asyncio.wait_for(wake.wait(), IDLE_WATCH_INTERVAL if ACTIVITY.idle() else interval)
                # A request started: poll at the fast interval from now on, not at once, which on one vCPU would
                # compete with the request itself (what it starts listens later, if at all).
                poll = False
            except TimeoutError:
                poll = True
    finally:
        ACTIVITY.wakers.discard(wake)
