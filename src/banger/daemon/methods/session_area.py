"""session.* methods (and guest.session.send): long-running processes owned by the guest, not by a connection."""

from __future__ import annotations

from typing import Any

from banger.daemon.app import App
from banger.errors import InvalidInputError
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    sessions = app.sessions

    @reg.method("session.start")
    async def start(
        ctx: CallContext,
        vm: str,
        argv: list[str],
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        restart: str = "no",
    ) -> dict[str, Any]:
        """Start a session in a running VM; returns it once its process runs."""
        return await sessions.start(
            vm, argv, name=name, env=env or {}, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols, restart=restart
        )

    @reg.method("session.list")
    async def list_(ctx: CallContext, vm: str | None = None) -> list[dict[str, Any]]:
        """Sessions of one VM, or of every VM."""
        return await sessions.list(vm)

    @reg.method("session.logs")
    async def logs(ctx: CallContext, vm: str, session: str, follow: bool = False) -> dict[str, Any]:
        """Everything a session wrote, as output events; with follow, until it ends."""
        return await sessions.logs(vm, session, follow=follow, emit=ctx.send_event)

    @reg.method("session.attach")
    async def attach(ctx: CallContext, vm: str, session: str, rows: int = 24, cols: int = 80) -> dict[str, Any]:
        """Join a running session interactively; detaching (cancelling the call) leaves it running."""
        return await sessions.attach(vm, session, rows=rows, cols=cols, inbox=ctx.inbox, emit=ctx.send_event)

    @reg.method("guest.session.send")
    async def send(
        ctx: CallContext, vm: str, session: str, text: str | None = None, newline: bool = True, eof: bool = False
    ) -> dict[str, Any]:
        """Write TEXT (and a newline) to a session's stdin; eof then closes it."""
        if text is None and not eof:
            raise InvalidInputError("nothing to send: give TEXT or --eof")
        data = b"" if text is None else (text + ("\n" if newline else "")).encode()
        return await sessions.send(vm, session, data, eof=eof)

    @reg.method("session.stop")
    async def stop(ctx: CallContext, vm: str, session: str, signal: int = 15, timeout: float = 10.0) -> dict[str, Any]:
        """Signal a session (no more restarts), SIGKILL after timeout; returns it once it ended."""
        if not 0 <= timeout <= 3600:
            raise InvalidInputError("timeout must be between 0 and 3600 seconds")
        return await sessions.stop(vm, session, signal=signal, timeout=timeout)

    @reg.method("session.rm")
    async def rm(ctx: CallContext, vm: str, session: str, force: bool = False) -> dict[str, Any]:
        """Forget a session and its output (a running one only with force)."""
        await sessions.remove(vm, session, force=force)
        return {"removed": session}
