"""banger guest agent: serves the framed protocol (see protocol.py) over virtio-serial or vsock.

Runs inside the guest as a child of banger-init, from the seed drive, with the stdlib only. Usage:

    agent.py --serial org.banger.agent [--init-pid 1]   # virtio-serial port found by name
    agent.py --vsock 1024 [--init-pid 1]                # AF_VSOCK listener, one session per connection
    agent.py --connect /path/sock                       # Unix socket standing in for the serial port (tests)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from banger.guest import execs, guesttunnel, ports, session_agent, sshsetup
    from banger.guest.protocol import VERSION, Fd, Frame, Kind, Mux, Stream, read_frame, stream_writer
    from banger.guest.transfer import InboundPipe, OutboundPipe, TransferError, extract_tar, transfer_target, write_tar
else:  # run from the seed drive, where the guest modules are plain siblings
    import execs
    import guesttunnel
    import ports
    import session_agent
    import sshsetup
    from protocol import VERSION, Fd, Frame, Kind, Mux, Stream, read_frame, stream_writer
    from transfer import InboundPipe, OutboundPipe, TransferError, extract_tar, transfer_target, write_tar

RECONNECT_DELAY = 0.25  # between looks for a host on the serial port, once none has come for a while
RECONNECT_FIRST = 0.02  # the first look after a session ended, doubling up to RECONNECT_DELAY: a restored clone's
# session with its snapshot's host ends at resume, and its new host connects within a few hundredths of a second
_STARTED = time.monotonic()
_ERROR_CODES: list[tuple[type[BaseException], str]] = [
    (FileNotFoundError, "not_found"),
    (PermissionError, "permission"),
    (TransferError, "unsafe"),
    (execs.ExecError, "exec_failed"),
    (ConnectionError, "refused"),
    (ValueError, "invalid"),
    (KeyError, "invalid"),
    *session_agent.ERROR_CODES,
]


def log(message: str) -> None:
    """One line on the agent's stderr (the guest console under banger-init)."""
    print(f"banger-agent: {message}", file=sys.stderr, flush=True)


_ready_fd: int | None = None


def announce_ready() -> None:
    """Tell banger-init (through --ready-fd) that a transport serves, once: it holds back work such as the console's
    login shell until then, so that on a one-vCPU guest that work does not delay the agent's first answer."""
    global _ready_fd
    if _ready_fd is not None:
        fd, _ready_fd = _ready_fd, None
        with contextlib.suppress(OSError):
            os.write(fd, b"ready\n")
        with contextlib.suppress(OSError):
            os.close(fd)


class Session:
    """One protocol session: requests in flight and the connection they share."""

    def __init__(self, mux: Mux, init_pid: int | None) -> None:
        self.mux = mux
        self.init_pid = init_pid
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.nonce: object = None
        self.resetting = False

    async def run(self) -> None:
        """Serve frames until the host goes away."""
        try:
            while True:
                await self.dispatch(await read_frame(self.mux.reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await self.reset()

    async def reset(self) -> None:
        """Forget every stream (their processes are killed by their tasks' cleanup)."""
        # Streams of a dead session get no END: nobody wants it, and on a port without a host the write would block.
        self.resetting = True
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        self.mux.close_streams()
        self.resetting = False

    async def dispatch(self, frame: Frame) -> None:
        """Route one incoming frame."""
        if frame.kind == Kind.HELLO:
            # A host repeats HELLO until answered; only a new nonce (a new host) ends the previous session.
            if frame.header.get("nonce") != self.nonce:
                await self.reset()
                self.nonce = frame.header.get("nonce")
                await self.mux.send_padding()
            await self.mux.send(
                Kind.HELLO, 0, nonce=frame.header.get("nonce"), version=VERSION, pid=os.getpid(), **hello_extras()
            )
        elif frame.kind == Kind.CANCEL:
            # A second cancel would interrupt the first one's cleanup (killing and reaping the process).
            if (task := self.tasks.get(frame.id)) and not task.cancelling():
                task.cancel()
        elif frame.kind in HANDLERS and frame.id not in self.tasks:
            stream = Stream(frame.id)
            self.mux.streams[frame.id] = stream
            self.tasks[frame.id] = asyncio.create_task(self.serve(stream, frame))
        elif not self.mux.route(frame) and frame.kind not in (Kind.DATA, Kind.EOF, Kind.ACK, Kind.RESIZE, Kind.SIGNAL):
            await self.mux.send(Kind.END, frame.id, ok=False, error=_error("unsupported", f"unknown {frame.kind!r}"))

    async def serve(self, stream: Stream, frame: Frame) -> None:
        """Run one request's handler and end its stream with its result or error."""
        reply: dict[str, Any] | None
        in_use = frame.kind not in NOT_USE  # what makes port watches poll at their fast interval
        if in_use:
            guesttunnel.ACTIVITY.started()
        try:
            result = await HANDLERS[Kind(frame.kind)](self, stream, frame)
            reply = None if result is None else {"ok": True, **result}
        except asyncio.CancelledError:
            reply = {"ok": False, "error": _error("cancelled", "request cancelled")}
        except Exception as exc:
            code = next((c for t, c in _ERROR_CODES if isinstance(exc, t)), "failed")
            reply = {"ok": False, "error": _error(code, str(exc) or type(exc).__name__)}
        finally:
            if in_use:
                guesttunnel.ACTIVITY.ended()
            self.tasks.pop(stream.id, None)
            self.mux.streams.pop(stream.id, None)
            stream.credit.close()
        if reply is not None and not self.resetting:
            try:
                await self.mux.send(Kind.END, stream.id, **reply)
            except (OSError, ConnectionError):
                pass  # the host is gone; the session is being torn down


def hello_extras() -> dict[str, Any]:
    """What a HELLO reply tells the host besides the version: the request kinds this agent serves."""
    return {"kinds": sorted(HANDLERS)}


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


async def handle_health(session: Session, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Agent version, uptime and load."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {
        "version": VERSION,
        "uptime": uptime,
        "agent_uptime": time.monotonic() - _STARTED,
        "load": list(os.getloadavg()),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }


async def handle_ports(session: Session, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Listening TCP/UDP sockets with their owning processes."""
    found = await asyncio.to_thread(ports.listening_ports)
    return {"ports": [p.to_json() for p in found]}


async def handle_poweroff(session: Session, stream: Stream, frame: Frame) -> None:
    """Acknowledge, then ask banger-init to power the machine off."""
    if session.init_pid is None:
        raise ValueError("agent was not started by banger-init; refusing to power off")
    try:
        await session.mux.send(Kind.END, stream.id, ok=True)
    finally:
        # Even if the host hangs up as soon as it reads the reply (which cancels this task), the request stands.
        log("poweroff requested by host")
        os.kill(session.init_pid, signal.SIGTERM)


async def handle_reidentify(session: Session, stream: Stream, frame: Frame) -> dict[str, Any]:
    """A restored clone takes its own identity: run() of the module text the host sent (guest/reidentify.py of the
    host's version) in this process, on a thread, with the identity the host sent; its report is the reply."""
    source, identity = frame.header.get("source"), frame.header.get("identity")
    if not isinstance(source, str) or not isinstance(identity, dict):
        raise ValueError("reidentify needs the module's source and the identity")
    namespace: dict[str, Any] = {"__name__": "banger_reidentify"}
    exec(compile(source, "<banger reidentify>", "exec"), namespace)
    report = await asyncio.to_thread(namespace["run"], identity)
    return {"report": report}


async def handle_exec(session: Session, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Run a process, streaming its stdio over the stream."""
    spec = execs.ExecSpec.from_header(frame.header)
    child = execs.spawn(spec)
    mux = session.mux
    pumps = [_Pump(mux, stream, fd, src) for fd, src in child.outputs()]
    control = asyncio.create_task(_control(mux, stream, child))
    try:
        status = await child.wait()
        await _drain(pumps)
        return status
    finally:
        for task in (control, *(p.task for p in pumps)):
            task.cancel()
        await asyncio.gather(control, *(p.task for p in pumps), return_exceptions=True)
        # Shielded: even if this task is cancelled again, the process is still killed, reaped and its fds closed.
        await asyncio.shield(child.kill())


class _Pump:
    """Copies one output fd of a process into DATA frames; remembers since when it has been waiting for input."""

    def __init__(self, mux: Mux, stream: Stream, fd: Fd, src: int) -> None:
        self.reading_since: float | None = None
        self.task = asyncio.create_task(self._run(mux, stream, fd, src))

    async def _run(self, mux: Mux, stream: Stream, fd: Fd, src: int) -> None:
        while True:
            self.reading_since = time.monotonic()
            data = await execs.read_fd(src, 65536)
            self.reading_since = None
            if not data or not await mux.send_data(stream, fd, data):
                break
        await mux.send(Kind.EOF, stream.id, fd=int(fd))


async def _drain(pumps: list[_Pump]) -> None:
    """After exit, forward what is left in the pipes; stop once they stay silent for DRAIN_GRACE.

    A pump waiting for credit (a slow host) is never cut short, but a background grandchild that keeps the pipe
    open must not keep the exec from finishing.
    """
    while pending := [p for p in pumps if not p.task.done()]:
        now = time.monotonic()
        if all(p.reading_since is not None and now - p.reading_since >= execs.DRAIN_GRACE for p in pending):
            return
        await asyncio.wait([p.task for p in pending], timeout=execs.DRAIN_GRACE / 4)


async def _control(mux: Mux, stream: Stream, child: execs.Child) -> None:
    stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
    # stdin is written by its own task so that a process not reading stdin cannot hold up SIGNAL or RESIZE.
    writer = asyncio.create_task(_write_stdin(mux, stream, child, stdin))
    try:
        while True:
            frame = await stream.inbox.get()
            if frame.kind == Kind.DATA:
                stdin.put_nowait(frame.payload)
            elif frame.kind == Kind.EOF:
                stdin.put_nowait(None)
            elif frame.kind == Kind.RESIZE:
                child.resize(int(frame.header["rows"]), int(frame.header["cols"]))
            elif frame.kind == Kind.SIGNAL:
                child.signal(int(frame.header["signal"]))
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def _write_stdin(mux: Mux, stream: Stream, child: execs.Child, queue: asyncio.Queue[bytes | None]) -> None:
    while (data := await queue.get()) is not None:
        await child.write_stdin(data)
        mux.ack(stream.id, len(data))
    child.close_stdin()


async def handle_put(session: Session, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Receive a tar stream and place its contents at the requested path."""
    target = transfer_target(Path(frame.header["path"]), str(frame.header.get("name", "")))
    user = frame.header.get("user")
    pw = execs.passwd_entry(str(user)) if user is not None else None
    owner = (pw.pw_uid, pw.pw_gid) if pw is not None else None
    loop = asyncio.get_running_loop()
    pipe = InboundPipe(loop, lambda n: session.mux.ack(stream.id, n))
    worker = asyncio.create_task(asyncio.to_thread(extract_tar, pipe, target, keep_owner=False, owner=owner))
    feeder = asyncio.create_task(_feed(stream, pipe))
    try:
        await worker
    finally:
        feeder.cancel()
        pipe.abort()
        await asyncio.gather(feeder, return_exceptions=True)
    return {"path": str(target)}


async def _feed(stream: Stream, pipe: InboundPipe) -> None:
    while True:
        frame = await stream.inbox.get()
        if frame.kind == Kind.DATA:
            pipe.feed(frame.payload)
        elif frame.kind in (Kind.EOF, Kind.END):
            pipe.feed_eof()
            return


async def handle_get(session: Session, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Send the requested path as a tar stream."""
    source = Path(frame.header["path"])
    if not os.path.lexists(source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    loop = asyncio.get_running_loop()

    async def send(chunk: bytes) -> bool:
        return await session.mux.send_data(stream, Fd.OUT, chunk)

    pipe = OutboundPipe(loop, send)
    try:
        await asyncio.to_thread(write_tar, source, pipe)
    finally:
        pipe.abort()  # if we were cancelled, the thread stops at its next write
    await session.mux.send(Kind.EOF, stream.id, fd=int(Fd.OUT))
    return {"path": str(source)}


Handler = Callable[[Session, Stream, Frame], Awaitable[dict[str, Any] | None]]
HANDLERS: dict[Kind, Handler] = {
    Kind.HEALTH: handle_health,
    Kind.PORTS: handle_ports,
    Kind.POWEROFF: handle_poweroff,
    Kind.EXEC: handle_exec,
    Kind.REIDENTIFY: handle_reidentify,
    Kind.PUT: handle_put,
    Kind.GET: handle_get,
    Kind.TUNNEL: guesttunnel.handle_tunnel,
    Kind.LISTEN: guesttunnel.handle_listen,
    Kind.WATCH: guesttunnel.handle_watch,
    Kind.SSH: sshsetup.handle_ssh,
    **session_agent.HANDLERS,
}

# Requests that do not count as the guest being in use: watches and reverse listeners stay open for the VM's life,
# and health checks are the host's.
NOT_USE = frozenset({Kind.WATCH, Kind.LISTEN, Kind.HEALTH})


async def serve_fd(fd: int, init_pid: int | None) -> None:
    """Serve one session over a raw file descriptor until it reads EOF."""
    reader = asyncio.StreamReader()

    async def pump() -> None:
        while data := await execs.read_fd(fd, 65536):
            reader.feed_data(data)
        reader.feed_eof()

    async def write(data: bytes) -> None:
        await execs.write_fd(fd, data)

    mux = Mux(reader, write)
    pumper = asyncio.create_task(pump())
    announcer = asyncio.create_task(_announce(mux))
    try:
        await Session(mux, init_pid).run()
    finally:
        for task in (pumper, announcer):
            task.cancel()
        await asyncio.gather(pumper, announcer, return_exceptions=True)


async def _announce(mux: Mux) -> None:
    # A host may stay connected to the port while this agent restarts (it crashed, init started it again); a HELLO
    # nobody asked for tells that host its session is gone. Writes block until a host is there to read them.
    await mux.send_padding()
    await mux.send(Kind.HELLO, 0, nonce=None, version=VERSION, pid=os.getpid())


def find_serial_port(name: str, sysfs: str = "/sys/class/virtio-ports") -> Path | None:
    """The /dev node of the virtio-serial port called `name`, if the device exists."""
    try:
        entries = sorted(os.listdir(sysfs))
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(sysfs, entry, "name")) as f:
                if f.read().strip() == name:
                    return Path("/dev") / entry
        except OSError:
            continue
    return None


async def serve_serial(name: str, init_pid: int | None) -> None:
    """Serve sessions on a virtio-serial port forever."""
    logged = served = False
    delay = RECONNECT_DELAY
    while True:
        path = find_serial_port(name)
        if path is None:
            if not logged:
                log(f"waiting for virtio-serial port {name!r}")
                logged = True
            await asyncio.sleep(1)
            continue
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if not served:
            log(f"serving virtio-serial port {name!r} ({path})")  # the readiness line on this transport
            served = True
            announce_ready()
        opened = time.monotonic()
        try:
            await serve_fd(fd, init_pid)
        finally:
            os.close(fd)
        # The port reads EOF while no host is connected and poll() reports HUP, so there is no fd event to wait on:
        # look again soon after a session ended, then less and less often.
        delay = RECONNECT_FIRST if time.monotonic() - opened > 1.0 else min(delay * 2, RECONNECT_DELAY)
        await asyncio.sleep(delay)


async def serve_connect(path: str, init_pid: int | None) -> None:
    """Serve sessions over a Unix socket we connect to, reconnecting after EOF like the serial port."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
            await asyncio.sleep(RECONNECT_DELAY)
            continue
        sock.setblocking(False)
        try:
            await serve_fd(sock.fileno(), init_pid)
        finally:
            sock.close()
        await asyncio.sleep(RECONNECT_DELAY)


async def serve_vsock(port: int, init_pid: int | None) -> None:
    """Serve one session per AF_VSOCK connection on `port` (returns at once if the VM has no vsock device)."""
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        log(f"vsock unavailable ({exc}); not listening on port {port}")
        return
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
    except OSError as exc:
        sock.close()
        log(f"vsock unavailable ({exc}); not listening on port {port}")
        return

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await Session(Mux(reader, stream_writer(writer)), init_pid).run()
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, sock=sock)
    log(f"listening on vsock port {port}")
    announce_ready()
    async with server:
        await server.serve_forever()


USAGE = """usage: banger-agent [--serial NAME] [--vsock PORT] [--connect PATH] [--init-pid PID] [--sessions-dir DIR]
                    [--ready-fd FD]

  --serial NAME        serve the virtio-serial port with this name
  --vsock PORT         listen on this AF_VSOCK port
  --connect PATH       connect to this Unix socket instead (tests)
  --init-pid PID       pid to SIGTERM when the host asks for poweroff
  --sessions-dir DIR   where guest sessions keep their state and output
  --ready-fd FD        write a line to this fd, then close it, once a transport serves
"""
_OPTIONS = {
    "--serial": str,
    "--vsock": int,
    "--connect": str,
    "--init-pid": int,
    "--sessions-dir": str,
    "--ready-fd": int,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """The options in `argv` keyed without their dashes (`init_pid`); ValueError names what is wrong.

    A hand-written parser rather than argparse: under TCG importing argparse costs the guest's boot a visible
    share of the agent's start-up, and these five options need none of it.
    """
    found: dict[str, Any] = {}
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=")
        if name not in _OPTIONS:
            raise ValueError(f"unknown argument {word!r}")
        if not eq:
            if not rest:
                raise ValueError(f"{name} needs a value")
            value = rest.pop(0)
        try:
            found[name[2:].replace("-", "_")] = _OPTIONS[name](value)
        except ValueError:
            raise ValueError(f"{name}: invalid value {value!r}") from None
    return found


def main(argv: list[str] | None = None) -> int:
    """Entry point when run from the seed drive."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE, end="")
        return 0
    try:
        args = parse_args(argv)
    except ValueError as exc:
        print(f"{USAGE}banger-agent: error: {exc}", file=sys.stderr)
        return 2
    if args.get("sessions_dir"):
        session_agent.set_root(args["sessions_dir"])
    global _ready_fd
    _ready_fd = args.get("ready_fd")
    # banger-init blocks signals to collect them with sigwaitinfo; that mask must not reach user processes.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    init_pid = args.get("init_pid")
    servers = []
    if args.get("serial"):
        servers.append(serve_serial(args["serial"], init_pid))
    if args.get("vsock") is not None:
        servers.append(serve_vsock(args["vsock"], init_pid))
    if args.get("connect"):
        servers.append(serve_connect(args["connect"], init_pid))
    if not servers:
        print(f"{USAGE}banger-agent: error: give at least one of --serial, --vsock, --connect", file=sys.stderr)
        return 2
    log(f"protocol v{VERSION} starting (pid {os.getpid()})")

    async def serve_all() -> None:
        await asyncio.gather(*servers)

    try:
        asyncio.run(serve_all())
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
