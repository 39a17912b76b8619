"""Host side of the agent protocol: an asyncio client over the VM's virtio-serial chardev or Firecracker vsock."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import secrets
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, NoReturn

from banger import errors
from banger.guest.ports import ListeningPort
from banger.guest.protocol import (
    BASE_REQUEST_KINDS,
    OLDEST_AGENT_VERSION,
    UNSUPPORTED_BY_AGENT,
    VERSION,
    Fd,
    Kind,
    Mux,
    Stream,
    WindowExceeded,
    read_frame,
    stream_writer,
)
from banger.guest.transfer import InboundPipe, OutboundPipe, TransferError, extract_tar, transfer_target, write_tar

log = logging.getLogger("banger.guest.client")

HELLO_RETRY = 1.0
OutputSink = Callable[[bytes], Awaitable[None] | None]
StdinSource = bytes | AsyncIterable[bytes] | asyncio.StreamReader


class AgentError(errors.BangerError):
    """The agent reported a failure or the connection to it broke."""


_ERRORS: dict[str, type[errors.BangerError]] = {
    "not_found": errors.NotFoundError,
    "unsafe": errors.UnsafeArchiveError,
    "invalid": errors.InvalidInputError,
    "unsupported": errors.UnsupportedError,
    "cancelled": errors.CancelledError,
    "exists": errors.AlreadyExistsError,
}


def _raise_for(header: dict[str, Any]) -> NoReturn:
    err = header.get("error") or {}
    code, message = str(err.get("code", "failed")), str(err.get("message", "agent request failed"))
    if code == "unsupported":  # an agent older than this request kind
        message = f"{message}: {UNSUPPORTED_BY_AGENT}"
    raise _ERRORS.get(code, AgentError)(f"guest agent: {message}", data={"agent_code": code})


raise_for = _raise_for  # for request modules outside this file (sessions/guestapi.py)


@dataclass(frozen=True)
class Health:
    """What the agent says about itself and the guest."""

    version: int
    uptime: float
    agent_uptime: float
    load: tuple[float, float, float]
    hostname: str
    pid: int


@dataclass(frozen=True)
class ExitStatus:
    """How a guest process ended: an exit code, or the signal that killed it."""

    exit_code: int | None
    signal: int | None

    @property
    def ok(self) -> bool:
        """Exited with status 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class ExecResult:
    """A finished process with its captured output."""

    status: ExitStatus
    stdout: bytes
    stderr: bytes


async def _deliver(sink: OutputSink | None, data: bytes) -> None:
    if sink is not None:
        result = sink(data)
        if inspect.isawaitable(result):
            await result


@dataclass
class ExecHandle:
    """A process running in the guest: feed stdin, resize, signal, wait."""

    client: AgentClient
    stream: Stream
    stdout: OutputSink | None
    stderr: OutputSink | None
    _pump: asyncio.Task[ExitStatus] | None = field(default=None, init=False)
    _cancelled: bool = field(default=False, init=False)

    def start(self) -> None:
        """Begin delivering output to the sinks."""
        self._pump = asyncio.create_task(self._run())
        # Callers that cancel a process and never wait for it must not leave an unretrieved exception behind.
        self._pump.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self) -> ExitStatus:
        mux = self.client.mux
        try:
            while True:
                frame = await self.stream.inbox.get()
                if frame.kind == Kind.DATA:
                    await _deliver(self.stderr if frame.header.get("fd") == Fd.ERR else self.stdout, frame.payload)
                    # ACK only after the sink took the bytes: a slow sink throttles its own process, nothing else.
                    mux.ack(self.stream.id, len(frame.payload))
                elif frame.kind == Kind.END:
                    if not frame.header.get("ok"):
                        _raise_for(frame.header)
                    return ExitStatus(frame.header.get("exit_code"), frame.header.get("signal"))
        except BaseException:
            if self.stream.id in mux.streams:  # a sink failed: the process must not run on unwatched
                await self.cancel()
            raise
        finally:
            self.client.forget(self.stream)

    async def write(self, data: bytes) -> None:
        """Send bytes to the process's stdin (waits while the agent's window is full)."""
        await self.client.mux.send_data(self.stream, Fd.IN, data)

    async def close_stdin(self) -> None:
        """End of input."""
        await self.client.mux.send(Kind.EOF, self.stream.id, fd=int(Fd.IN))

    async def resize(self, rows: int, cols: int) -> None:
        """Change the terminal size of a tty exec."""
        await self.client.mux.send(Kind.RESIZE, self.stream.id, rows=rows, cols=cols)

    async def signal(self, signum: int) -> None:
        """Send a signal to the process group."""
        await self.client.mux.send(Kind.SIGNAL, self.stream.id, signal=int(signum))

    async def cancel(self) -> None:
        """Ask the agent to kill the process and end the stream (once; later calls do nothing)."""
        if self._cancelled:
            return
        self._cancelled = True
        with contextlib.suppress(OSError, ConnectionError):
            await self.client.mux.send(Kind.CANCEL, self.stream.id)

    async def wait(self) -> ExitStatus:
        """Wait for the process to end; raises if it could not be started."""
        if self._pump is None:
            raise RuntimeError("ExecHandle.start() was not called")
        return await asyncio.shield(self._pump)


class AgentClient:
    """One protocol session with a guest agent. Use `async with await AgentClient.connect_unix(path)`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.mux = Mux(reader, stream_writer(writer), enforce_window=True)
        self._writer = writer
        self._ids = itertools.count(1)
        self._nonce = secrets.token_hex(8)
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.agent_version = VERSION
        # None: the agent did not say (an older one), so it serves BASE_REQUEST_KINDS.
        self.agent_kinds: frozenset[Kind] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def connect_unix(cls, path: str | Path, *, timeout: float = 30.0) -> AgentClient:
        """Connect to QEMU's chardev socket for the virtio-serial port and open a session."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        return await cls.open(reader, writer, timeout=timeout)

    @classmethod
    async def connect_firecracker_vsock(cls, uds_path: str | Path, port: int, *, timeout: float = 30.0) -> AgentClient:
        """Connect through Firecracker's vsock Unix socket (CONNECT handshake), retrying until the agent listens."""
        async with _deadline(timeout, "agent did not accept a vsock connection"):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(str(uds_path))
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.2)  # the VMM has not bound its socket yet
                    continue
                writer.write(f"CONNECT {port}\n".encode())
                await writer.drain()
                line = await reader.readline()
                if line.startswith(b"OK "):
                    break
                # Firecracker hangs up when nothing listens on the guest port yet: the agent may still be starting.
                writer.close()
                await asyncio.sleep(0.2)
        return await cls.open(reader, writer, timeout=timeout)

    @classmethod
    async def open(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float) -> AgentClient:
        """Start a session on an already connected stream."""
        client = cls(reader, writer)
        try:
            await client._handshake(timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _handshake(self, timeout: float) -> None:
        self._reader_task = asyncio.create_task(self._read_loop())
        waiters: list[asyncio.Future[Any]] = [self._hello, self._reader_task]
        async with _deadline(timeout, "guest agent did not answer"):
            await self.mux.send_padding()
            while not self._hello.done():
                await self.mux.send(Kind.HELLO, 0, nonce=self._nonce, version=VERSION)
                await asyncio.wait(waiters, timeout=HELLO_RETRY, return_when=asyncio.FIRST_COMPLETED)
                if self._reader_task.done() and not self._hello.done():
                    raise AgentError("guest agent connection closed during handshake")
        reply = self._hello.result()
        version = reply.get("version")
        if not isinstance(version, int) or not OLDEST_AGENT_VERSION <= version <= VERSION:
            raise errors.VersionMismatchError(
                f"guest agent speaks protocol {version}, host {OLDEST_AGENT_VERSION} to {VERSION}",
                hint=UNSUPPORTED_BY_AGENT,
            )
        self.agent_version = version
        kinds = reply.get("kinds")
        self.agent_kinds = frozenset(Kind(k) for k in kinds if k in Kind.__members__.values()) if kinds else None

    async def _read_loop(self) -> None:
        reason = None
        try:
            while True:
                frame = await read_frame(self.mux.reader)
                if frame.kind == Kind.HELLO:
                    if frame.header.get("nonce") == self._nonce:
                        if not self._hello.done():
                            self._hello.set_result(frame.header)
                    elif self._hello.done():
                        log.info("guest agent restarted (pid %s); session over", frame.header.get("pid"))
                        reason = f"the guest agent restarted (pid {frame.header.get('pid')}); try again"
                        return
                elif self._hello.done():
                    self.mux.route(frame)  # unknown ids are leftovers of streams we gave up on
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except WindowExceeded as exc:
            # A guest that ignores credit is cut off rather than buffered: the agent then kills what this
            # session ran, and the next request opens a fresh session.
            reason = f"the guest agent ignored flow control ({exc})"
            log.warning("%s; closing its connection", reason)
            self._writer.close()
        finally:
            self._closed = True
            self.mux.close_streams(reason)

    async def close(self) -> None:
        """Drop the connection; the agent kills whatever this session still runs."""
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """False once the connection has dropped."""
        return not self._closed

    def supports(self, kind: Kind) -> bool:
        """Whether this VM's agent serves requests of `kind` (it may be older than the host)."""
        return kind in (self.agent_kinds if self.agent_kinds is not None else BASE_REQUEST_KINDS)

    async def _request(self, kind: Kind, **fields: Any) -> Stream:
        if self._closed:
            raise AgentError("guest agent connection is closed")
        if not self.supports(kind):
            raise errors.UnsupportedError(f"{kind.value} is {UNSUPPORTED_BY_AGENT}", data={"agent_code": "unsupported"})
        stream = Stream(next(self._ids))
        self.mux.streams[stream.id] = stream
        await self.mux.send(kind, stream.id, **fields)
        return stream

    async def open_stream(self, kind: Kind, **fields: Any) -> Stream:
        """Open a stream of any kind, for modules that speak one request themselves (guest/tunnelclient.py)."""
        return await self._request(kind, **fields)

    async def call(self, kind: Kind, timeout: float | None, /, **fields: Any) -> dict[str, Any]:
        """One request and its END result."""
        return await self._call(kind, timeout, **fields)

    async def cancel_stream(self, stream: Stream) -> None:
        """Ask the agent to end a stream (fire and forget)."""
        await self._cancel(stream)

    def forget(self, stream: Stream) -> None:
        """Stop routing frames to a finished stream."""
        stream.credit.close()
        self.mux.streams.pop(stream.id, None)

    async def _end(self, stream: Stream) -> dict[str, Any]:
        try:
            while (frame := await stream.inbox.get()).kind != Kind.END:
                pass
        finally:
            self.forget(stream)
        if not frame.header.get("ok"):
            _raise_for(frame.header)
        return frame.header

    async def _call(self, kind: Kind, timeout: float | None, /, **fields: Any) -> dict[str, Any]:
        stream = await self._request(kind, **fields)
        try:
            async with _deadline(timeout, f"guest agent did not answer {kind}"):
                return await self._end(stream)
        except errors.TimeoutError_:
            await self._cancel(stream)
            raise

    async def _cancel(self, stream: Stream) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            await self.mux.send(Kind.CANCEL, stream.id)

    async def request(self, kind: Kind, wait: float | None = None, /, **fields: Any) -> dict[str, Any]:
        """One request whose only answer is its END frame (e.g. the session requests), within `wait` seconds."""
        return await self._call(kind, wait, **fields)

    async def health(self, timeout: float | None = 10.0) -> Health:
        """Agent version, guest uptime and load."""
        h = await self._call(Kind.HEALTH, timeout)
        one, five, fifteen = (float(x) for x in h["load"])
        return Health(
            int(h["version"]),
            float(h["uptime"]),
            float(h["agent_uptime"]),
            (one, five, fifteen),
            h["hostname"],
            h["pid"],
        )

    async def ports(self, timeout: float | None = 10.0) -> list[ListeningPort]:
        """Listening TCP sockets and bound UDP sockets in the guest, with owning pid and command."""
        reply = await self._call(Kind.PORTS, timeout)
        return [ListeningPort.from_json(p) for p in reply["ports"]]

    async def poweroff(self, timeout: float | None = 10.0) -> None:
        """Ask the guest to shut down cleanly (the agent hands this to banger-init)."""
        await self._call(Kind.POWEROFF, timeout)

    async def start_exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
    ) -> ExecHandle:
        """Start a process in the guest and return a handle to talk to it."""
        stream = await self._request(
            Kind.EXEC, argv=list(argv), env=env or {}, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols
        )
        handle = ExecHandle(self, stream, stdout, stderr)
        handle.start()
        return handle

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: StdinSource | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        timeout: float | None = None,
    ) -> ExitStatus:
        """Run a process to completion, streaming stdio; on timeout or cancellation the process is killed.

        `stdin` None means end of input at once (for a tty: the EOF character); use start_exec to feed it later.
        """
        handle = await self.start_exec(
            argv, env=env, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols, stdout=stdout, stderr=stderr
        )
        feeder = asyncio.create_task(_feed_stdin(handle, stdin))
        try:
            async with _deadline(timeout, f"{argv[0]} did not finish within {timeout}s"):
                return await handle.wait()
        except BaseException:
            await handle.cancel()
            raise
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def run(self, argv: list[str], *, input: bytes | None = None, **kwargs: Any) -> ExecResult:
        """Run a process and capture its stdout and stderr."""
        out, err = bytearray(), bytearray()
        status = await self.exec(argv, stdin=input, stdout=out.extend, stderr=err.extend, **kwargs)
        return ExecResult(status, bytes(out), bytes(err))

    async def put(self, local_path: str | Path, remote_path: str, *, user: str | None = None) -> str:
        """Copy a local file or directory (modes kept) to the guest, owned by `user` (default: the agent's, root).

        Lands inside `remote_path` if that is an existing directory (like cp), else at `remote_path`, replacing it.
        Returns the guest path it landed at.
        """
        local = Path(local_path)
        if not local.exists() and not local.is_symlink():
            raise errors.NotFoundError(f"{local}: no such file or directory")
        stream = await self._request(Kind.PUT, path=remote_path, name=local.name, user=user)
        loop = asyncio.get_running_loop()

        async def send(chunk: bytes) -> bool:
            return await self.mux.send_data(stream, Fd.IN, chunk)

        pipe = OutboundPipe(loop, send)
        # The tar thread is never cancelled (that would orphan it); it is aborted, then waited for.
        tar_thread = asyncio.ensure_future(asyncio.to_thread(write_tar, local, pipe))

        async def upload() -> None:
            await asyncio.shield(tar_thread)
            await self.mux.send(Kind.EOF, stream.id, fd=int(Fd.IN))

        sender = asyncio.create_task(upload())
        ender = asyncio.create_task(self._end(stream))
        try:
            await asyncio.wait([sender, ender], return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and sender.exception() is not None:
                await self._cancel(stream)
                await sender
            reply = await ender
        finally:
            pipe.abort()
            self.forget(stream)
            for task in (sender, ender):
                task.cancel()
            await asyncio.gather(sender, ender, tar_thread, return_exceptions=True)
        return str(reply["path"])

    async def get(
        self, remote_path: str, local_path: str | Path, *, owner: tuple[int, int] | None = None, journal: Any = None
    ) -> Path:
        """Copy a guest file or directory here (modes kept, owned by us or `owner`), merged like `cp -r`; into
        `local_path` if that is a directory."""
        target = transfer_target(Path(local_path), PurePosixPath(remote_path).name)
        stream = await self._request(Kind.GET, path=remote_path)
        pipe = InboundPipe(asyncio.get_running_loop(), lambda n: self.mux.ack(stream.id, n))
        worker = asyncio.ensure_future(
            asyncio.to_thread(extract_tar, pipe, target, keep_owner=False, owner=owner, journal=journal)
        )
        feeder = asyncio.create_task(_feed_pipe(stream, pipe))
        try:
            await asyncio.wait([worker, feeder], return_when=asyncio.FIRST_COMPLETED)
            if worker.done() and worker.exception() is not None:
                await self._cancel(stream)
                await worker
            await feeder  # raises the agent's error, if any
            await worker
        except TransferError as exc:
            raise errors.UnsafeArchiveError(f"refusing what the guest sent for {remote_path}: {exc}") from exc
        finally:
            self.forget(stream)
            pipe.abort()  # the extracting thread fails out; it is waited for, never orphaned
            feeder.cancel()
            await asyncio.gather(worker, feeder, return_exceptions=True)
        return target


async def _feed_pipe(stream: Stream, pipe: InboundPipe) -> None:
    while True:
        frame = await stream.inbox.get()
        if frame.kind == Kind.DATA:
            pipe.feed(frame.payload)
        elif frame.kind == Kind.EOF:
            pipe.feed_eof()
        elif frame.kind == Kind.END:
            if not frame.header.get("ok"):
                _raise_for(frame.header)
            return


async def _feed_stdin(handle: ExecHandle, stdin: StdinSource | None) -> None:
    if isinstance(stdin, bytes):
        await handle.write(stdin)
    elif isinstance(stdin, asyncio.StreamReader):
        while data := await stdin.read(65536):
            await handle.write(data)
    elif stdin is not None:
        async for data in stdin:
            await handle.write(data)
    await handle.close_stdin()


@contextlib.asynccontextmanager
async def _deadline(timeout: float | None, message: str) -> Any:
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as exc:
        raise errors.TimeoutError_(message) from exc
