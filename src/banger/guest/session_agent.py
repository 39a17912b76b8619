"""The agent's session requests (stdlib only): start supervisors, list them, stream their logs, talk to them.

The agent owns no session: it starts a supervisor (sessions.py) and afterwards only reads the session's files and
speaks to its control socket, so any agent instance (a restarted one included) serves every session.

Requests (header fields -> END result), see protocol.py for the framing:
    SESSION_START {name, argv, env, cwd, user, tty, rows, cols, restart, log_max_bytes, session_kind} -> {session}
    SESSION_LIST  {}                                       -> {sessions: [session, ...]}
    SESSION_READ  {name, offset, follow}                   -> {offset, session}; output as DATA fd 1 frames,
                  each with "off" (its logical offset: a jump means older output was dropped)
    SESSION_CTL   {name, op, data?, eof?, rows?, cols?, signal?, timeout?} -> {session} (stop: once it ended)
    SESSION_RM    {name, force}                            -> {}
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from banger.guest import execs, sessions
    from banger.guest.protocol import MAX_CHUNK, Fd, Frame, Kind, Mux, Stream
    from banger.guest.sessionlog import LogReader
else:  # run from the seed drive, where the guest modules are plain siblings
    import execs
    from protocol import MAX_CHUNK, Fd, Frame, Kind, Mux, Stream
    from sessionlog import LogReader

    import sessions

START_TIMEOUT = 180.0  # two Python starts in a guest that may be emulated on a busy host
_root = Path(sessions.DEFAULT_ROOT)


class SessionExists(Exception):
    """A session of that name exists already."""


def set_root(path: str) -> None:
    """Where session directories live (the agent's --sessions-dir)."""
    global _root
    _root = Path(path)


def session_dir(name: str) -> Path:
    """The directory of an existing session; FileNotFoundError if there is none."""
    directory = _root / sessions.validate_name(str(name))
    if not (directory / sessions.SPEC).exists():
        raise FileNotFoundError(f"no session named {name!r}")
    return directory


async def handle_start(session: Any, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Write the spec and start a supervisor for it; returns once the process runs (or failed to start)."""
    h = frame.header
    name = sessions.validate_name(str(h.get("name", "")))
    spec = execs.ExecSpec.from_header(h)
    restart = str(h.get("restart") or "no")
    if restart not in sessions.RESTART_POLICIES:
        raise ValueError(f"unknown restart policy {restart!r} (choose no, on-failure or always)")
    _root.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = _root / name
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        raise SessionExists(f"a session named {name!r} exists already") from None
    doc = {
        "name": name,
        "kind": str(h.get("session_kind") or "process"),
        "argv": spec.argv,
        "env": spec.env,
        "cwd": spec.cwd,
        "user": spec.user,
        "tty": spec.tty,
        "rows": spec.rows,
        "cols": spec.cols,
        "restart": restart,
        "log_max_bytes": int(h.get("log_max_bytes") or 64 << 20),
        "created_at": time.time(),
    }
    try:
        sessions.write_json(directory / sessions.SPEC, doc)
        script = str(Path(sessions.__file__).resolve())
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-B", script, "supervise", str(directory)],
            capture_output=True,
            timeout=START_TIMEOUT,
            cwd="/",
            check=False,
        )
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        report = json.loads(lines[-1]) if lines else {}
        if not report.get("ok"):
            problem = report.get("error") or done.stderr.decode(errors="replace").strip() or "supervisor failed"
            raise execs.ExecError(problem)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return {"session": sessions.describe(directory)}


async def handle_list(session: Any, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Every session in the guest."""
    try:
        names = sorted(os.listdir(_root))
    except FileNotFoundError:
        names = []
    found = [sessions.describe(_root / n) for n in names if (_root / n / sessions.SPEC).exists()]
    return {"sessions": found}


async def _control(directory: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection to the session's supervisor, None when it no longer runs."""
    try:
        return await asyncio.open_unix_connection(str(directory / sessions.CONTROL))
    except (FileNotFoundError, ConnectionRefusedError):
        return None


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: dict[str, Any]) -> None:
    writer.write(json.dumps(req).encode() + b"\n")
    await writer.drain()
    line = await reader.readline()
    if not line:
        raise ValueError("the session ended")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ValueError(str(reply.get("error", "session refused the request")))


async def handle_read(session: Any, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Send the session's output from an offset; with follow, until the session ends."""
    directory = session_dir(str(frame.header.get("name")))
    offset = int(frame.header.get("offset") or 0)
    follow = bool(frame.header.get("follow"))
    mux: Mux = session.mux
    reader = LogReader(directory / sessions.OUTPUT)
    conn = await _control(directory) if follow else None
    try:
        if conn is not None:
            try:
                await _ask(conn[0], conn[1], {"op": "watch"})  # wake-ups for every append from now on
            except (ValueError, ConnectionError):
                conn[1].close()  # it ended meanwhile
                conn = None
        while True:
            while True:
                start, data = reader.read(offset, MAX_CHUNK)  # a local file: quick
                offset = start + len(data)
                if not data:
                    break
                if not await stream.credit.take(len(data)):
                    raise asyncio.CancelledError
                await mux.send(Kind.DATA, stream.id, data, fd=int(Fd.OUT), off=start)
            if conn is None:
                break
            try:
                woken = await conn[0].read(4096)
            except ConnectionError:  # a supervisor that exits with bytes unread resets the connection
                woken = b""
            if not woken:  # EOF: the supervisor exited; one last read above catches the tail
                conn[1].close()
                conn = None
    finally:
        reader.close()
        if conn is not None:
            conn[1].close()
    await mux.send(Kind.EOF, stream.id, fd=int(Fd.OUT))
    return {"offset": offset, "session": sessions.describe(directory)}


async def handle_ctl(session: Any, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Input, resize, signal or stop for a running session."""
    h = frame.header
    directory = session_dir(str(h.get("name")))
    op = str(h.get("op"))
    if op not in ("input", "resize", "signal", "stop"):
        raise ValueError(f"unknown session operation {op!r}")
    conn = await _control(directory)
    if conn is None:
        if op == "stop":
            return {"session": sessions.describe(directory)}
        raise ValueError(f"session {directory.name} is not running")
    reader, writer = conn
    try:
        req: dict[str, Any] = {k: h[k] for k in ("data", "eof", "rows", "cols", "signal", "timeout") if k in h}
        try:
            await _ask(reader, writer, {"op": op, **req})
        except ConnectionError:
            raise ValueError(f"session {directory.name} is not running") from None
        if op == "stop":
            # The supervisor closes every connection when it exits: that EOF is the end of the stop.
            timeout = float(h.get("timeout", 10.0)) + 10.0
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(timeout):
                    while await reader.read(4096):
                        pass
    finally:
        writer.close()
    return {"session": sessions.describe(directory)}


async def handle_rm(session: Any, stream: Stream, frame: Frame) -> dict[str, Any]:
    """Delete a session's directory; a running one only with force (it is killed first)."""
    directory = session_dir(str(frame.header.get("name")))
    # A supervisor whose process has ended has recorded it (and answered the stop that ended it) a moment before
    # it lets go of its lock: that session is not running any more, and the removal waits for it to be gone.
    ended = sessions.read_json(directory / sessions.STATE).get("state") == "exited"
    if sessions.supervisor_alive(directory) and not ended:
        if not frame.header.get("force"):
            raise ValueError(f"session {directory.name} is running (stop it first)")
        conn = await _control(directory)
        if conn is not None:
            try:
                await _ask(conn[0], conn[1], {"op": "stop", "signal": 9, "timeout": 0})
                async with asyncio.timeout(15):
                    while await conn[0].read(4096):
                        pass
            except (ValueError, ConnectionError):
                pass  # it ended by itself meanwhile
            finally:
                conn[1].close()
    for _ in range(RM_WAIT_STEPS):
        if not sessions.supervisor_alive(directory):
            break
        await asyncio.sleep(0.05)
    await asyncio.to_thread(shutil.rmtree, directory)
    return {}


# How long a removal waits (in 50 ms steps) for a supervisor to exit once its session ended.
RM_WAIT_STEPS = 200


def encode_input(data: bytes) -> str:
    """How SESSION_CTL input travels in a header."""
    return base64.b64encode(data).decode()


Handler = Callable[[Any, Stream, Frame], Awaitable[dict[str, Any] | None]]
HANDLERS: dict[Kind, Handler] = {
    Kind.SESSION_START: handle_start,
    Kind.SESSION_LIST: handle_list,
    Kind.SESSION_READ: handle_read,
    Kind.SESSION_CTL: handle_ctl,
    Kind.SESSION_RM: handle_rm,
}
ERROR_CODES: list[tuple[type[BaseException], str]] = [(SessionExists, "exists")]
