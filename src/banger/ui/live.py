"""Live channels: daemon events and console tails as server-sent events, and the terminal as a websocket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from banger.cli.vm_cmds import LOGIN_SHELL
from banger.errors import BangerError, UnsupportedError
from banger.rpc import protocol
from banger.rpc.aclient import AsyncClient
from banger.ui.shells import DetachedShells

# Terminal shells: their sessions' name prefix, what they replay on reattach, their TERM.
SHELL_PREFIX = "shell-"
REPLAY = 64 << 10
TERM = "xterm-256color"
# How long the browser waits before reconnecting an event stream that ended (the daemon restarted, say).
RETRY_MS = 2000


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


async def _relay(request: Request, method: str, params: dict[str, Any], key: str | None) -> AsyncIterator[bytes]:
    """One streaming daemon call as SSE: each `$/event` (or its `key` field) becomes a message."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    try:
        async with AsyncClient(request.app.state.socket) as client:
            rid = client.start(method, params)
            async for note in client.notifications(rid):
                if note.get("id") == rid and (key is None or key in note):
                    yield _sse(note[key] if key else note)
            await client.reply(rid)
        # The call is over (the session or the VM ended): the page closes the stream instead of letting the browser
        # reconnect, which would replay everything again.
        yield _sse({}, event="end")
    except BangerError as exc:
        yield _sse({"error": exc.message, "hint": exc.hint}, event="failure")


def _stream(gen: AsyncIterator[bytes]) -> StreamingResponse:
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(gen, media_type="text/event-stream", headers=headers)


async def events(request: Request) -> StreamingResponse:
    """The daemon's event bus, relayed (`daemon.events`)."""
    return _stream(_relay(request, "daemon.events", {}, "event"))


async def console_follow(request: Request) -> StreamingResponse:
    """A VM's console log: the last lines, then new output as it is written (`vm.logs --follow`)."""
    params = {"name": request.path_params["name"], "follow": True, "lines": 200}
    return _stream(_relay(request, "vm.logs", params, "text"))


async def session_follow(request: Request) -> StreamingResponse:
    """A session's output or agent transcript from the start, then as it streams (`session logs -f`)."""
    params = {"vm": request.path_params["name"], "session": request.path_params["sid"], "follow": True}
    return _stream(_relay(request, "session.logs", params, None))


async def terminal(ws: WebSocket) -> None:
    """A login shell on a PTY in the guest: bytes both ways, resize as JSON.

    The shell is a guest session (kind process, named `shell-…`), so it outlives the page: the page keeps its name
    and, after a reload, asks for it again with `?session=NAME`; the call then reattaches and replays the recent
    output that redraws the screen. `?replace=NAME` ends an old shell first ("New shell"). The first text message
    names the session: `{"session": NAME}`. Against a daemon without sessions the shell is a plain `vm.exec`,
    which ends with the page. A shell no page attaches to for the UI's grace period is ended (ui/shells.py).
    """
    rows = _int(ws.query_params.get("rows"), 24)
    cols = _int(ws.query_params.get("cols"), 80)
    vm = ws.path_params["name"]
    shells: DetachedShells = ws.app.state.shells
    await ws.accept()
    try:
        async with AsyncClient(ws.app.state.socket) as client:
            old = ws.query_params.get("replace")
            if old and old.startswith(SHELL_PREFIX):
                await _end_shell(client, vm, old)
                shells.ended(vm, old)
            name = await _shell_session(client, vm, ws.query_params.get("session"), rows, cols)
            if name is not None:
                shells.attached(vm, name)  # from here on, however the page leaves, its shell is counted out
            try:
                if name is None:
                    params = {"name": vm, "argv": LOGIN_SHELL, "env": {"TERM": TERM}, "tty": True}
                    rid = client.start("vm.exec", {**params, "rows": rows, "cols": cols, "stdin": True})
                else:
                    await ws.send_text(json.dumps({"session": name}))
                    params = {"vm": vm, "session": name, "rows": rows, "cols": cols, "replay": REPLAY}
                    rid = client.start("session.attach", params)
                upstream = asyncio.create_task(_keys_to_guest(ws, client, rid))
                try:
                    async for note in client.notifications(rid):
                        if "data" in note:
                            await ws.send_bytes(base64.b64decode(note["data"]))
                    result = await client.reply(rid)
                finally:
                    upstream.cancel()
                    with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                        await upstream
            finally:
                if name is not None:
                    shells.detached(vm, name)  # ended after the grace period unless a page attaches again
            if name is not None:
                await _end_shell(client, vm, name)  # the shell exited: its session is of no more use
                shells.ended(vm, name)
        await ws.send_text(json.dumps({"exit": result}))
    except BangerError as exc:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.send_text(json.dumps({"error": exc.message, "hint": exc.hint}))
    except WebSocketDisconnect:
        return  # leaving the block closed the daemon connection: a session shell goes on, an exec shell ends
    with contextlib.suppress(RuntimeError):
        await ws.close()


async def _shell_session(client: AsyncClient, vm: str, wanted: str | None, rows: int, cols: int) -> str | None:
    """The shell session to attach to: `wanted` while it runs, else a new one; None when the daemon has no
    sessions."""
    if wanted and wanted.startswith(SHELL_PREFIX):
        with contextlib.suppress(BangerError):
            for row in await client.call("session.list", {"vm": vm}):
                if row.get("name") == wanted and row.get("state") == "running" and row.get("kind") == "process":
                    return wanted
    params = {
        "vm": vm,
        "argv": LOGIN_SHELL,
        "name": f"{SHELL_PREFIX}{secrets.token_hex(3)}",
        "env": {"TERM": TERM},
        "tty": True,
        "rows": rows,
        "cols": cols,
    }
    try:
        return str((await client.call("session.start", params))["name"])
    except UnsupportedError:  # a daemon from before sessions
        return None


async def _end_shell(client: AsyncClient, vm: str, name: str) -> None:
    with contextlib.suppress(BangerError):
        await client.call("session.rm", {"vm": vm, "session": name, "force": True})


async def _keys_to_guest(ws: WebSocket, client: AsyncClient, rid: int) -> None:
    """Browser -> guest: `{"data": text}` keystrokes and `{"resize": [rows, cols]}`."""
    try:
        while True:
            msg = json.loads(await ws.receive_text())
            if isinstance(msg.get("data"), str):
                data = base64.b64encode(msg["data"].encode()).decode()
                client.notify(protocol.INPUT, {"id": rid, "data": data})
            if isinstance(msg.get("resize"), list) and len(msg["resize"]) == 2:
                rows, cols = (_int(v, 0) for v in msg["resize"])
                if 0 < rows < 1000 and 0 < cols < 1000:
                    client.notify(protocol.INPUT, {"id": rid, "resize": [rows, cols]})
    except WebSocketDisconnect:
        await client.close()  # the browser went away: closing the call ends the shell in the guest


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


ROUTES = [
    Route("/api/events", events),
    Route("/api/vms/{name}/console", console_follow),
    Route("/api/vms/{name}/sessions/{sid}/logs", session_follow),
    WebSocketRoute("/api/vms/{name}/terminal", terminal),
]
