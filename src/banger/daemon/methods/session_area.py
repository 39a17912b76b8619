"""session.* methods (and guest.session.send): long-running processes owned by the guest, not by a connection."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from banger.agents.conversations import render
from banger.daemon.app import App
from banger.errors import InvalidInputError
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext


def register(reg: MethodRegistry, app: App) -> None:
    sessions = app.sessions
    conversations = app.conversations

    def is_agent(vm: str, session: str) -> bool:
        return sessions.get(app.vms.get(vm), session).kind == "agent"

    @reg.method("session.start")
    async def start(
        ctx: CallContext,
        vm: str,
        argv: list[str] | None = None,
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        restart: str = "no",
        agent: str | None = None,
        title: str | None = None,
    ) -> dict[str, Any]:
        """Start a session in a running VM; returns it once its process runs. agent: a conversation with the
        VM's coding agent instead (an agent VM)."""
        if agent is not None:
            if agent != "opencode":
                raise InvalidInputError(f"unknown agent {agent!r} (choose opencode)")
            if argv:
                raise InvalidInputError("an agent session takes no command")
            return await conversations.open(vm, name=name, title=title)
        return await sessions.start(
            vm, argv or [], name=name, env=env or {}, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols, restart=restart
        )

    @reg.method("session.list")
    async def list_(ctx: CallContext, vm: str | None = None) -> list[dict[str, Any]]:
        """Sessions of one VM, or of every VM."""
        return await sessions.list(vm)

    @reg.method("session.logs")
    async def logs(
        ctx: CallContext, vm: str, session: str, follow: bool = False, json_events: bool = False
    ) -> dict[str, Any]:
        """Everything a session wrote, as output events; with follow, until it ends. An agent session's
        transcript comes as readable lines, or JSON Lines with json_events."""
        if is_agent(vm, session):

            async def show_saved(events: list[dict[str, Any]]) -> None:
                for event in events:
                    await ctx.send_event({"text": (json.dumps(event) if json_events else render(event)) + "\n"})

            saved = conversations.events(vm, session)
            await show_saved(saved)
            if follow:  # then the turn in flight, as it streams (its final events only, as JSON Lines)

                async def show(chunk: str) -> None:
                    await ctx.send_event({"text": chunk})

                if not await conversations.follow(vm, session, show, events=json_events):
                    # No turn in flight now: one may have ended since the transcript was read; show what it saved.
                    await show_saved(conversations.events(vm, session)[len(saved) :])
            return {}
        return await sessions.logs(vm, session, follow=follow, emit=ctx.send_event)

    @reg.method("session.attach")
    async def attach(
        ctx: CallContext, vm: str, session: str, rows: int = 24, cols: int = 80, replay: int = 0
    ) -> dict[str, Any]:
        """Join a running session interactively; detaching (cancelling the call) leaves it running. replay: first
        send up to this many bytes of what it wrote before (a terminal that reattaches redraws from them)."""
        if is_agent(vm, session):
            raise InvalidInputError("an agent session has no terminal", hint="use session send and session logs")
        return await sessions.attach(
            vm, session, rows=rows, cols=cols, inbox=ctx.inbox, emit=ctx.send_event, replay=replay
        )

    @reg.method("guest.session.send")
    async def send(
        ctx: CallContext,
        vm: str,
        session: str,
        text: str | None = None,
        newline: bool = True,
        eof: bool = False,
        wait: bool = False,
    ) -> dict[str, Any]:
        """Write TEXT (and a newline) to a session's stdin; eof then closes it. To an agent session: TEXT is a
        prompt; wait returns once the agent is idle (the turn's transcript streams as text events)."""
        if is_agent(vm, session):
            if eof:
                raise InvalidInputError("--eof is refused for an agent session")
            if not text:
                raise InvalidInputError("nothing to send: give the prompt as TEXT")

            async def show(chunk: str) -> None:
                await ctx.send_event({"text": chunk})

            turn = asyncio.create_task(conversations.prompt(vm, session, text, wait=wait, emit=show))

            async def interrupted() -> None:  # the CLI's first Ctrl-C arrives as a signal: abort the turn
                while "signal" not in await ctx.inbox.get():
                    pass
                turn.cancel()

            watcher = asyncio.create_task(interrupted())
            try:
                return await turn
            except asyncio.CancelledError:
                if not watcher.done() or watcher.cancelled():
                    raise  # the call itself was cancelled
                return {"idle": True, "aborted": True, "error": "the turn was aborted (Ctrl-C)"}
            finally:
                watcher.cancel()
        if text is None and not eof:
            raise InvalidInputError("nothing to send: give TEXT or --eof")
        data = b"" if text is None else (text + ("\n" if newline else "")).encode()
        return await sessions.send(vm, session, data, eof=eof)

    @reg.method("session.stop")
    async def stop(ctx: CallContext, vm: str, session: str, signal: int = 15, timeout: float = 10.0) -> dict[str, Any]:
        """Signal a session (no more restarts), SIGKILL after timeout; returns it once it ended."""
        if not 0 <= timeout <= 3600:
            raise InvalidInputError("timeout must be between 0 and 3600 seconds")
        if is_agent(vm, session):
            return await conversations.abort(vm, session)  # aborts the running turn
        return await sessions.stop(vm, session, signal=signal, timeout=timeout)

    @reg.method("session.rm")
    async def rm(ctx: CallContext, vm: str, session: str, force: bool = False) -> dict[str, Any]:
        """Forget a session and its output (a running one only with force)."""
        await sessions.remove(vm, session, force=force)
        return {"removed": session}
