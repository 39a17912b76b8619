"""`banger ui`: the Starlette app, its guard, and a uvicorn server on a socket bound before the URL is printed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from banger.errors import InvalidInputError
from banger.ui import api, live
from banger.ui.guard import Guard, GuardMiddleware
from banger.ui.shells import DEFAULT_GRACE, DetachedShells
from banger.ui.state import TokenChecker, UiState, state_path

STATIC = Path(str(resources.files("banger.ui") / "static"))


async def index(request: Request) -> Response:
    """The single page; the client-side router shows VMs, a VM, kernels or images."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


def build_app(socket_path: Path, guard: Guard, shell_grace: float = DEFAULT_GRACE) -> Starlette:
    """The UI's ASGI app for the daemon at `socket_path`; terminal shells no page attaches to for `shell_grace`
    seconds are ended (0: never)."""
    shells = DetachedShells(socket_path, shell_grace)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await shells.close()

    app = Starlette(
        routes=[
            *api.ROUTES,
            *live.ROUTES,
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/", index),
        ],
        middleware=[Middleware(GuardMiddleware, guard=guard)],
        lifespan=lifespan,
    )
    app.state.socket = socket_path
    app.state.shells = shells
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, so the printed URL names the real port (also for --port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror}", hint="pick another --port") from exc
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(
    socket_path: Path, host: str, port: int, on_ready: Callable[[str], None], *, shell_grace: float = DEFAULT_GRACE
) -> None:
    """Run the UI until interrupted; `on_ready` gets the first login URL once the socket listens."""
    sock = bind(host, port)
    state = UiState(pid=os.getpid(), host=host, port=sock.getsockname()[1], secret=secrets.token_hex(32))
    spath = state_path(socket_path, state.pid)
    guard = Guard(bound_host=host, port=state.port, tokens=TokenChecker(state.secret))
    config = uvicorn.Config(
        build_app(socket_path, guard, shell_grace),
        log_level="warning",
        access_log=False,
        ws_ping_interval=20.0,
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the previous handler: make
    # that one an exception for SIGTERM too, so the `finally` below still removes the state file.
    signal.signal(signal.SIGTERM, _terminated)
    state.write(spath)
    try:
        on_ready(state.url(state.mint()))
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(server.serve(sockets=[sock]))
    finally:
        state.remove(spath)
        sock.close()
