"""Framing shared by the host client and the guest agent (stdlib only: it ships on the seed drive).

Wire format. Both directions carry the same frames over one byte stream (virtio-serial port or vsock):

    MAGIC "BGR1" | u32 header_len | u32 payload_len | header (UTF-8 JSON object) | payload (raw bytes)

Integers are big-endian. A header always has "t" (a Kind) and "id" (stream id, an int); other keys depend on the
kind. Headers are at most MAX_HEADER bytes, payloads at most MAX_CHUNK (virtio-serial accepts 32 KiB per write). A
reader that finds no MAGIC where a frame should start, or a header that is not JSON, skips bytes until the next
MAGIC: a peer that disconnects mid-frame on virtio-serial leaves a torn frame behind, and the next session must
still get through. So whoever opens a session first sends SYNC_PADDING (zeros, longer than any frame), which
completes a torn frame into garbage that the reader then skips.

Sessions. The host opens a session by sending HELLO {nonce, version}; the agent forgets every stream of the
previous session (killing its processes) and answers SYNC_PADDING + HELLO {nonce, version, pid}. Frames that
arrive before the matching HELLO reply are ignored by the host, which resends HELLO (same nonce, no padding, no
reset) until answered: bytes written before the guest opens its port may sit in QEMU's buffers for a while. On
vsock every connection is its own session. Whenever the agent opens the serial port it also announces itself
with SYNC_PADDING + HELLO {nonce: null}: a host that sees such a HELLO after its handshake knows the agent was
restarted under it and that its session is gone.

Streams. Every request is a stream: the host picks a fresh id and sends the request frame (EXEC, PUT, GET, HEALTH,
PORTS, POWEROFF). Either side may then send DATA {fd} frames (fd 0 = stdin / upload, 1 = stdout / download,
2 = stderr) and EOF {fd}. The agent ends the stream with exactly one END frame: {"ok": true, ...result} or
{"ok": false, "error": {"code", "message"}}. Exec results are {"exit_code": int|null, "signal": int|null}.
EVENT {...} frames carry news of a long-lived stream (agent to host).
Host-only control frames on a running exec: RESIZE {rows, cols}, SIGNAL {signal}. CANCEL stops any stream.
The agent ends streams of a session that is over (HELLO with a new nonce, EOF) without END.

Requests (header fields -> END result):
    HEALTH   {}                                          -> {version, uptime, agent_uptime, load, hostname, pid}
    EXEC     {argv, env, cwd, user, tty, rows, cols}     -> {exit_code, signal}; stdio as DATA/EOF fd 0/1/2
                                                            (a tty exec has one terminal stream: fd 0 in, fd 1 out)
    PUT      {path, name, user}                          -> {path}; host sends a tar (transfer.py) as DATA fd 0
    GET      {path}                                      -> {path}; agent sends a tar as DATA fd 1
    PORTS    {}                                          -> {ports: [{proto, address, port, inode, pid, comm}]}
    POWEROFF {}                                          -> {} then the agent signals banger-init
    TUNNEL   {port} | {accept}                           -> {}; a TCP stream (guesttunnel.py): the agent connects
                                                            to 127.0.0.1:port (or takes connection `accept` of a
                                                            LISTEN), sends EVENT {connected}, then bytes flow as
                                                            DATA fd 0 (host -> guest) / fd 1 (guest -> host) + EOF
    LISTEN   {port}                                      -> never ends by itself; binds guest 127.0.0.1:port, sends
                                                            EVENT {listening}, then EVENT {accepted: conn} per
                                                            connection, which the host claims with TUNNEL {accept}
    WATCH    {interval}                                  -> never ends by itself; EVENT {ports: [...]} with the
                                                            listening TCP ports whenever the set changes
    SSH      {keys, user}                                -> {sshd, host_keys}; authorizes keys, reports host keys
    SESSION_* (start, list, read, ctl, rm): long-running sessions owned by a guest-side supervisor, not by this
             connection; see session_agent.py
Error codes: not_found, permission, unsafe, exec_failed, invalid, unsupported, cancelled, failed.

Flow control. Each side may have at most WINDOW unacknowledged DATA payload bytes in flight per stream; the
receiver sends ACK {n} once it has consumed n bytes (written them to a process, a file, or a host sink). So a slow
consumer stalls only its own stream, never the connection. The host enforces this: an agent that sends beyond
the window (or queues more than MAX_QUEUED_FRAMES frames on a stream) has its connection closed, with the reason
logged, instead of being buffered.

Room to grow: unknown kinds get an END with code "unsupported", so a newer host can probe an older agent (e.g. for
long-running SESSION streams that outlive one connection).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
MAGIC = b"BGR1"
_PREFIX = struct.Struct(">4sII")
MAX_CHUNK = 32 * 1024
MAX_HEADER = 64 * 1024
WINDOW = 256 * 1024
# Frames a stream may have queued unread, besides the byte window (small DATA frames are merged, see Inbox).
MAX_QUEUED_FRAMES = 16 * 1024
# Zeros that complete any frame torn by a previous connection; they then fail to parse and the reader resyncs.
SYNC_PADDING = bytes(_PREFIX.size + MAX_HEADER + MAX_CHUNK)
SERIAL_PORT_NAME = "org.banger.agent"
DEFAULT_VSOCK_PORT = 1024

Header = dict[str, Any]


class Kind(enum.StrEnum):
    """Frame kinds; see the module docstring for who sends which."""

    HELLO = "hello"
    HEALTH = "health"
    EXEC = "exec"
    PUT = "put"
    GET = "get"
    PORTS = "ports"
    POWEROFF = "poweroff"
    TUNNEL = "tunnel"
    LISTEN = "listen"
    WATCH = "watch"
    SSH = "ssh"
    EVENT = "event"
    SESSION_START = "session_start"
    SESSION_LIST = "session_list"
    SESSION_READ = "session_read"
    SESSION_CTL = "session_ctl"
    SESSION_RM = "session_rm"
    REIDENTIFY = "reidentify"
    DATA = "data"
    EOF = "eof"
    ACK = "ack"
    RESIZE = "resize"
    SIGNAL = "signal"
    CANCEL = "cancel"
    END = "end"


# A running VM keeps the agent it booted with (it sits on the VM's seed drive), so a newer host must still talk
# to older agents: it accepts any agent version from OLDEST_AGENT_VERSION up to VERSION. Agents list the request
# kinds they serve in their HELLO ("kinds"); an agent that lists none serves BASE_REQUEST_KINDS.
OLDEST_AGENT_VERSION = 1
BASE_REQUEST_KINDS = frozenset({Kind.HEALTH, Kind.EXEC, Kind.PUT, Kind.GET, Kind.PORTS, Kind.POWEROFF})
UNSUPPORTED_BY_AGENT = "unsupported by this VM's agent: restart the VM"


class Fd(enum.IntEnum):
    """Which byte stream of a request a DATA/EOF frame belongs to."""

    IN = 0
    OUT = 1
    ERR = 2


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    kind: str
    id: int
    header: Header
    payload: bytes = b""


def encode(kind: Kind, sid: int, payload: bytes = b"", **fields: Any) -> bytes:
    """Serialise one frame."""
    header = json.dumps({"t": str(kind), "id": sid, **fields}, separators=(",", ":")).encode()
    if len(payload) > MAX_CHUNK:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_CHUNK")
    return _PREFIX.pack(MAGIC, len(header), len(payload)) + header + payload


async def _sync_to_magic(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(MAGIC)
            return
        except asyncio.LimitOverrunError as exc:
            # No MAGIC within the reader's limit: drop what cannot hold the start of one and keep looking.
            await reader.readexactly(max(exc.consumed, 1))


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read the next well-formed frame, skipping garbage; raises asyncio.IncompleteReadError at EOF."""
    while True:
        await _sync_to_magic(reader)
        hlen, plen = struct.unpack(">II", await reader.readexactly(8))
        if hlen > MAX_HEADER or plen > MAX_CHUNK:
            continue  # a false MAGIC inside garbage: resync from here
        raw = await reader.readexactly(hlen)
        payload = await reader.readexactly(plen) if plen else b""
        try:
            header = json.loads(raw)
        except ValueError:
            continue
        if (
            not isinstance(header, dict)
            or not isinstance(header.get("t"), str)
            or not isinstance(header.get("id"), int)
        ):
            continue
        return Frame(header["t"], header["id"], header, payload)


class Credit:
    """Bytes one side may still send on a stream before the peer ACKs (loop-thread only)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._available = window
        self._changed = asyncio.Event()
        self._closed = False

    async def take(self, n: int) -> bool:
        """Wait until `n` bytes may be sent; False if the stream went away meanwhile."""
        while not self._closed and self._available < n:
            self._changed.clear()
            await self._changed.wait()
        if self._closed:
            return False
        self._available -= n
        return True

    def grant(self, n: int) -> None:
        """The peer consumed `n` bytes."""
        self._available += n
        self._changed.set()

    def close(self) -> None:
        """Wake every waiter with False."""
        self._closed = True
        self._changed.set()


class Inbox:
    """Frames received on one stream, oldest first (loop-thread only).

    A DATA frame that follows a DATA frame of the same fd is merged into it (up to MAX_CHUNK), so a peer's small
    writes cost one queued frame per chunk, not one per write.
    """

    def __init__(self) -> None:
        self._frames: collections.deque[Frame] = collections.deque()
        self._ready = asyncio.Event()

    def put_nowait(self, frame: Frame) -> None:
        """Queue a frame."""
        last = self._frames[-1] if self._frames else None
        if (
            last is not None
            and frame.kind == Kind.DATA
            and last.kind == Kind.DATA
            and last.header.get("fd") == frame.header.get("fd")
            and len(last.payload) + len(frame.payload) <= MAX_CHUNK
        ):
            self._frames[-1] = Frame(last.kind, last.id, last.header, last.payload + frame.payload)
        else:
            self._frames.append(frame)
        self._ready.set()

    async def get(self) -> Frame:
        """The oldest frame, waiting for one."""
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    def qsize(self) -> int:
        """How many (merged) frames wait."""
        return len(self._frames)


@dataclass
class Stream:
    """One multiplexed request as both sides track it."""

    id: int
    inbox: Inbox = field(default_factory=Inbox)
    credit: Credit = field(default_factory=Credit)
    # DATA payload bytes received and not yet ACKed by us: a peer that keeps credit stays within WINDOW.
    unacked: int = 0


class WindowExceeded(ProtocolError):
    """The peer sent more on a stream than the flow-control window allows (it ignores credit)."""


Writer = Callable[[bytes], Awaitable[None]]


class Mux:
    """Frame I/O over one connection: serialised writes, per-stream credit, chunked data."""

    def __init__(self, reader: asyncio.StreamReader, write: Writer, *, enforce_window: bool = False) -> None:
        self.reader = reader
        self._write = write
        self._lock = asyncio.Lock()
        self.streams: dict[int, Stream] = {}
        # The host enforces the window (the guest is untrusted); route() then raises WindowExceeded.
        self.enforce_window = enforce_window

    async def send(self, kind: Kind, sid: int, payload: bytes = b"", **fields: Any) -> None:
        """Send one frame; frames never interleave."""
        data = encode(kind, sid, payload, **fields)
        async with self._lock:
            await self._write(data)

    async def send_padding(self) -> None:
        """Send SYNC_PADDING (see the module docstring)."""
        async with self._lock:
            await self._write(SYNC_PADDING)

    async def send_data(self, stream: Stream, fd: Fd, data: bytes) -> bool:
        """Send bytes on a stream in chunks, waiting for credit; False if the stream closed."""
        view = memoryview(data)
        for start in range(0, len(view), MAX_CHUNK):
            chunk = bytes(view[start : start + MAX_CHUNK])
            if not await stream.credit.take(len(chunk)):
                return False
            await self.send(Kind.DATA, stream.id, chunk, fd=int(fd))
        return True

    def ack(self, sid: int, n: int) -> None:
        """Tell the peer we consumed `n` bytes of stream `sid` (fire and forget)."""
        stream = self.streams.get(sid)
        if stream is not None:
            stream.unacked -= n
        if n > 0:
            asyncio.get_running_loop().create_task(self._ack(sid, n))

    async def _ack(self, sid: int, n: int) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await self.send(Kind.ACK, sid, n=n)

    def route(self, frame: Frame) -> bool:
        """Deliver a stream frame (ACKs update credit); False if no such stream.

        With enforce_window, raises WindowExceeded when the peer overruns the window: it is not buffered.
        """
        stream = self.streams.get(frame.id)
        if stream is None:
            return False
        if frame.kind == Kind.ACK:
            stream.credit.grant(int(frame.header.get("n", 0)))
            return True
        if self.enforce_window:
            if frame.kind == Kind.DATA:
                stream.unacked += len(frame.payload)
            if stream.unacked > WINDOW:
                raise WindowExceeded(
                    f"stream {frame.id}: {stream.unacked} bytes unacknowledged, beyond the {WINDOW}-byte window"
                )
            if stream.inbox.qsize() >= MAX_QUEUED_FRAMES:
                raise WindowExceeded(f"stream {frame.id}: more than {MAX_QUEUED_FRAMES} frames queued")
        stream.inbox.put_nowait(frame)
        return True

    def close_streams(self, reason: str | None = None) -> None:
        """Wake everyone blocked on a stream of this connection (`reason` tells them why it closed)."""
        gone = {**_GONE, "message": f"{_GONE['message']}: {reason}"} if reason else _GONE
        for stream in self.streams.values():
            stream.credit.close()
            stream.inbox.put_nowait(Frame(str(Kind.END), stream.id, {"ok": False, "error": gone}))
        self.streams.clear()


_GONE = {"code": "disconnected", "message": "agent connection closed"}


def stream_writer(writer: asyncio.StreamWriter) -> Writer:
    """Adapt an asyncio StreamWriter to a Mux writer that respects backpressure."""

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return write
