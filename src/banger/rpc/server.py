"""The daemon's RPC server: one task per call, cancelled when its client cancels or goes away."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from banger import PROTOCOL_VERSION, __version__
from banger.buildinfo import code_id
from banger.errors import BangerError, ErrorCode
from banger.progress import ProgressEvent
from banger.rpc import protocol
from banger.rpc.registry import MethodRegistry, ParamsError
from banger.security.caller import Caller

log = logging.getLogger("banger.rpc")


class CallContext:
    """What a method handler sees of its call: its id, progress and event streams to the caller."""

    def __init__(self, conn: Connection, request_id: int | str, method: str) -> None:
        self._conn = conn
        self.request_id = request_id
        self.method = method
        # `$/input` notifications the client sends for this call (stdin data, resize, signals).
        self.inbox = InputInbox(MAX_INPUT_BYTES)
        # Who made the call (SO_PEERCRED when it connected): the daemon acts for these ids, never its own.
        self.caller: Caller = conn.caller
        self.peer_uid, self.peer_gid = conn.caller.uid, conn.caller.gid

    def progress(self, event: ProgressEvent) -> None:
        """Send a progress notification for this call (dropped if the client is gone)."""
        self._conn.send(protocol.request(protocol.PROGRESS, {"id": self.request_id, "event": event.to_json()}, None))

    def event(self, payload: dict[str, Any]) -> None:
        """Send a streamed event (e.g. output chunk) for this call."""
        self._conn.send(protocol.request(protocol.EVENT, {"id": self.request_id, **payload}, None))

    async def send_event(self, payload: dict[str, Any]) -> None:
        """Send an event and wait until the client has taken it in (backpressure for output streams)."""
        self.event(payload)
        with contextlib.suppress(ConnectionError):
            await self._conn.writer.drain()


Handler = Callable[..., Awaitable[Any]]
Invoke = Callable[[dict[str, Any]], Awaitable[Any]]
# Wraps every call after the handshake: checks the caller's right to it, may rewrite params and the result.
Middleware = Callable[["CallContext", str, dict[str, Any], Invoke], Awaitable[Any]]
# Decides at the handshake whether a caller may use the daemon at all (raises PermissionDeniedError).
Admit = Callable[[Caller], None]

# Bounds on what one client can make the daemon hold: calls running at once on a connection, and `$/input`
# bytes queued for a call that has not consumed them yet.
MAX_CALLS_PER_CONNECTION = 64
MAX_INPUT_BYTES = 64 * 1024 * 1024


class InputInbox(asyncio.Queue[dict[str, Any]]):
    """A call's queue of `$/input` messages, bounded by their size on the wire."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self._sizes: collections.deque[int] = collections.deque()

    def offer(self, item: dict[str, Any], size: int) -> bool:
        """Queue `item` (`size` bytes on the wire); False, and nothing queued, if that would pass the bound."""
        if self.queued_bytes + size > self.max_bytes:
            return False
        self._sizes.append(size)
        self.queued_bytes += size
        self.put_nowait(item)
        return True

    def _get(self) -> dict[str, Any]:
        self.queued_bytes -= self._sizes.popleft() if self._sizes else 0
        return super()._get()


# Methods served to a client running other code than the daemon (or another protocol): enough to see the
# daemon and to stop it, so an upgrade can always replace it.
ACROSS_VERSIONS = frozenset({"daemon.status", "daemon.stop"})

# How long closing one connection waits for its cancelled calls, then for its unread replies to drain.
CLOSE_GRACE = 5.0


class Connection:
    """One client connection: reads calls, runs each as a task, writes replies in order of completion."""

    def __init__(self, server: RpcServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tasks: dict[int | str, asyncio.Task[None]] = {}
        self.contexts: dict[int | str, CallContext] = {}
        # Calls that got their reply; a call cancelled before its task ever ran is answered by _finished.
        self.replied: set[int | str] = set()
        self.hello_done = False
        # Whether the client runs the same code as this daemon (its build matches): if not, only the methods of
        # ACROSS_VERSIONS are served, so an old daemon can still be seen and stopped after an upgrade.
        self.same_code = False
        self.caller = self._peer()

    def _peer(self) -> Caller:
        """The client process's ids (SO_PEERCRED, SO_PEERGROUPS)."""
        sock = self.writer.get_extra_info("socket")
        try:
            return Caller.from_socket(sock)
        except (OSError, AttributeError):
            return Caller.of_daemon()

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        try:
            while True:
                try:
                    line = await self.reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    self.send(protocol.error(None, ErrorCode.INVALID_REQUEST, "message too long"))
                    break
                except ConnectionError:
                    break
                self._dispatch(line)
                await self.writer.drain()
        finally:
            await self.close()

    def _dispatch(self, line: bytes) -> None:
        try:
            req = protocol.parse_request(line)
        except protocol.ProtocolError as exc:
            self.send(protocol.error(exc.id, exc.code, str(exc)))
            return
        if req.method == protocol.CANCEL:
            task = self.tasks.get(req.params.get("id"))  # type: ignore[arg-type]
            if task is not None:
                log.info("cancel requested for call %s", req.params.get("id"))
                task.cancel()
            return
        if req.method == protocol.INPUT:
            ctx = self.contexts.get(req.params.get("id"))  # type: ignore[arg-type]
            if ctx is not None and not ctx.inbox.offer(req.params, len(line)):
                # Not buffered without bound: the call fails instead (its cleanup runs as for any cancel).
                log.warning(
                    "call %s (%s): over %d bytes of input not consumed; cancelling it",
                    ctx.request_id,
                    ctx.method,
                    ctx.inbox.max_bytes,
                )
                task = self.tasks.get(ctx.request_id)
                if task is not None:
                    task.cancel()
            return
        if req.id is None:
            return  # other notifications from clients carry nothing we act on
        if req.id in self.tasks:
            self.send(protocol.error(req.id, ErrorCode.INVALID_REQUEST, f"request id {req.id!r} already in use"))
            return
        if len(self.tasks) >= MAX_CALLS_PER_CONNECTION:
            self.send(
                protocol.error(
                    req.id,
                    ErrorCode.INVALID_REQUEST,
                    f"too many calls in flight on one connection (at most {MAX_CALLS_PER_CONNECTION})",
                )
            )
            return
        # The context exists before the task runs: `$/input` lines right behind the call must find it.
        ctx = CallContext(self, req.id, req.method)
        self.contexts[req.id] = ctx
        task = asyncio.create_task(self._call(req, ctx), name=f"rpc:{req.method}:{req.id}")
        self.tasks[req.id] = task
        self.server.inflight.add(task)
        task.add_done_callback(functools.partial(self._finished, req.id))

    def _finished(self, rid: int | str, task: asyncio.Task[None]) -> None:
        self.tasks.pop(rid, None)
        ctx = self.contexts.pop(rid, None)
        if rid not in self.replied and task.cancelled():
            self.send(protocol.error(rid, ErrorCode.CANCELLED, f"{ctx.method if ctx else 'call'} was cancelled"))
        self.replied.discard(rid)
        self.server.inflight.discard(task)

    async def _call(self, req: protocol.Request, ctx: CallContext) -> None:
        assert req.id is not None
        if req.method == protocol.HELLO:
            self.send(self._hello(req))
            self.replied.add(req.id)
            return
        if not self.hello_done and self.server.admit is not None:
            # The methods served across versions skip the handshake, never the check of who is calling.
            try:
                self.server.admit(self.caller)
            except BangerError as exc:
                self.send(protocol.error(req.id, exc.code, exc.message, {"hint": exc.hint} if exc.hint else None))
                self.replied.add(req.id)
                return
        refusal = self._refusal(req.method)
        if refusal is not None:
            self.send(protocol.error(req.id, ErrorCode.VERSION_MISMATCH, refusal))
            self.replied.add(req.id)
            return
        try:
            value = await self.server.dispatch(ctx, req.method, req.params)
        except asyncio.CancelledError:
            log.info("call %s (%s) cancelled; cleanup done", req.id, req.method)
            self.send(protocol.error(req.id, ErrorCode.CANCELLED, f"{req.method} was cancelled"))
            self.replied.add(req.id)
            raise
        except ParamsError as exc:
            self.send(protocol.error(req.id, exc.code, str(exc)))
        except BangerError as exc:
            log.info("call %s (%s) failed: %s", req.id, req.method, exc)
            data = dict(exc.data)
            if exc.hint:
                data["hint"] = exc.hint
            self.send(protocol.error(req.id, exc.code, exc.message, data or None))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.exception("call %s (%s) crashed", req.id, req.method)
                self.send(protocol.error(req.id, ErrorCode.INTERNAL, f"internal error in {req.method}: {exc!r}"))
            else:  # a full disk is the host's state, not a bug: say so in one line
                log.warning("call %s (%s): %s", req.id, req.method, exc)
                hint = "free some space on the filesystem holding the state root, then retry"
                message = f"{req.method}: no space left on device"
                self.send(protocol.error(req.id, ErrorCode.GENERIC, message, {"hint": hint}))
        except Exception as exc:
            log.exception("call %s (%s) crashed", req.id, req.method)
            self.send(protocol.error(req.id, ErrorCode.INTERNAL, f"internal error in {req.method}: {exc!r}"))
        else:
            self.send(protocol.result(req.id, value))
        self.replied.add(req.id)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def _hello(self, req: protocol.Request) -> bytes:
        client_version = req.params.get("version")
        client_proto = req.params.get("protocol")
        client_build = req.params.get("build")
        if client_proto != PROTOCOL_VERSION:
            return protocol.error(
                req.id,
                ErrorCode.VERSION_MISMATCH,
                f"banger CLI {client_version} speaks protocol {client_proto}, this daemon (pid {os.getpid()}) "
                f"protocol {PROTOCOL_VERSION}; stop it with `banger daemon stop` and retry",
            )
        if self.server.admit is not None:
            try:
                self.server.admit(self.caller)
            except BangerError as exc:
                log.info("refused uid %d (pid %d): %s", self.caller.uid, self.caller.pid, exc)
                return protocol.error(req.id, exc.code, exc.message, {"hint": exc.hint} if exc.hint else None)
        self.hello_done = True
        # A client that states no build is an older CLI: it is the same code only if the version says so.
        self.same_code = client_version == __version__ and client_build in (None, self.server.build)
        return protocol.result(
            req.id,
            {
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "build": self.server.build,
                "same_code": self.same_code,
            },
        )

    def _refusal(self, method: str) -> str | None:
        """Why `method` is not served on this connection (None: it is)."""
        if method in ACROSS_VERSIONS or (self.hello_done and self.same_code):
            return None
        if not self.hello_done:
            return f"call {protocol.HELLO} with a matching protocol first"
        return (
            f"this daemon (pid {os.getpid()}, build {self.server.build}) runs other code than the CLI: "
            "stop it with `banger daemon stop` and retry (the next command starts the new one)"
        )

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Cancel this connection's calls (their cleanup runs), then close the socket; both bounded by `grace`.

        A call that outlives its cancellation, or a client that stopped reading (a suspended `vm logs -f`), must
        not hold the daemon: past the grace the call is left behind (logged) and the socket is aborted.
        """
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                log.error("call %s did not end within %ss of its cancellation", task.get_name(), grace)
        self.writer.close()
        try:
            async with asyncio.timeout(grace):
                await self.writer.wait_closed()
        except TimeoutError:
            log.warning("a client did not read its pending replies within %ss; dropping the connection", grace)
            self.writer.transport.abort()
        except (ConnectionError, OSError):
            pass  # the peer went first: nothing is left to flush
        self.server.connections.discard(self)


class RpcServer:
    """Listens on a Unix socket (0660 to a group, or 0600) and serves a MethodRegistry."""

    def __init__(
        self,
        registry: MethodRegistry,
        build: str | None = None,
        *,
        middleware: Middleware | None = None,
        admit: Admit | None = None,
    ) -> None:
        self.registry = registry
        # The code this daemon loaded, fixed at startup (its files may change under it, as in a `git pull`).
        self.build = build or code_id()
        self.middleware = middleware
        self.admit = admit
        self.connections: set[Connection] = set()
        self.inflight: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, path: Path, *, group: int | None = None) -> None:
        """Bind the socket with tight permissions from the start (no window where it is world-accessible).

        With `group`, members of that group may connect (mode 0660, group-owned); without, only the owner.
        """
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale socket: the caller holds the daemon lock, so nobody else is serving it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, 0o660 if group is not None else 0o600)
        self._server = await asyncio.start_unix_server(self._accept, sock=sock, limit=protocol.MAX_LINE)

    async def dispatch(self, ctx: CallContext, method: str, params: dict[str, Any]) -> Any:
        """Run one call's handler, through the middleware when there is one."""

        async def invoke(p: dict[str, Any]) -> Any:
            return await self.registry.call(method, ctx, p)

        if self.middleware is None:
            return await invoke(params)
        return await self.middleware(ctx, method, params, invoke)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        await conn.run()

    async def stop(self, path: Path | None = None, grace: float = 10.0) -> None:
        """Stop accepting, cancel in-flight calls and wait for their cleanup, close every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self.inflight):
            task.cancel()
        if self.inflight:
            _done, pending = await asyncio.wait(list(self.inflight), timeout=grace)
            for task in pending:
                log.error("call %s did not finish its cleanup within %ss", task.get_name(), grace)
        # Concurrently: each close is bounded, so the whole stop is too, however many clients hang.
        await asyncio.gather(*(conn.close() for conn in list(self.connections)))
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
