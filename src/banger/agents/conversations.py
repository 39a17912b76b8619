"""Agent sessions: conversations with the opencode server of an agent VM, recorded as sessions of kind `agent`.

Every call to opencode is made inside the guest through the agent (AgentVmService.http), so opencode listens on
the guest's loopback only. Completion is decided by opencode's session status (`GET /session/status`: the
session is idle once it is absent or `idle`) and confirmed by its messages (the last assistant message is
completed, or carries an error), never by its event stream alone. The transcript is derived from the messages
as JSON events ({type, time, ...}) and kept by the daemon in the session's host log, so `session logs` works
after the VM stops and after the daemon restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from banger.agents.service import AgentVmService
from banger.errors import BangerError, InvalidInputError
from banger.guest.client import AgentClient
from banger.guest.sessionlog import BoundedLog, LogReader
from banger.sessions.model import RUNNING, SessionRecord
from banger.vms.model import VmRecord

log = logging.getLogger("banger.agents")
POLL = 1.0
POLL_FAILURES = 10
Emit = Callable[[str], Awaitable[None]]
# The most rendered text one turn keeps for watchers that join late, and the chunks a watcher may fall behind.
MAX_TURN_TEXT = 4 << 20
WATCHER_BACKLOG = 4096
FELL_BEHIND = "\n[banger: this watcher fell behind the agent and was ended; `session logs` has the transcript]\n"
FELL_BEHIND_EVENT = (
    json.dumps({"type": "error", "time": 0, "message": "this watcher fell behind the agent and was ended"}) + "\n"
)
# Tool calls whose status can still change; a transcript event is final once it is not the newest one and, for a
# tool call, its status is not one of these.
TOOL_UNFINISHED = ("pending", "running")


def transcript(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """opencode's messages as transcript events: text, tool calls with their status, errors."""
    events: list[dict[str, Any]] = []
    for message in messages:
        info = message.get("info") or {}
        role = info.get("role")
        created = (info.get("time") or {}).get("created")
        for part in message.get("parts") or []:
            kind = part.get("type")
            stamp = ((part.get("time") or {}).get("start")) or created
            if kind == "text" and part.get("text"):
                events.append({"type": "text", "time": stamp, "role": role, "text": part["text"]})
            elif kind == "tool":
                state = part.get("state") or {}
                event = {"type": "tool", "time": stamp, "tool": part.get("tool"), "status": state.get("status")}
                if state.get("title"):
                    event["title"] = state["title"]
                if state.get("error"):
                    event["error"] = state["error"]
                events.append(event)
        error = info.get("error")
        if error:
            detail = (error.get("data") or {}).get("message") or error.get("name") or "agent error"
            events.append({"type": "error", "time": created, "message": str(detail)})
    return events


def render(event: dict[str, Any]) -> str:
    """One transcript event as a readable line."""
    kind = event.get("type")
    if kind == "text":
        return f"{event.get('role') or 'assistant'}: {event.get('text')}"
    if kind == "tool":
        extra = f" {event['title']}" if event.get("title") else ""
        failed = f" ({event['error']})" if event.get("error") else ""
        return f"[tool {event.get('tool')}: {event.get('status')}]{extra}{failed}"
    if kind == "error":
        return f"[error] {event.get('message')}"
    if kind == "idle":
        return "[idle]"
    return json.dumps(event)


def _final(event: dict[str, Any], newest: bool) -> bool:
    """Whether a transcript event of a turn in flight can no longer change."""
    return not newest and not (event.get("type") == "tool" and event.get("status") in TOOL_UNFINISHED)


class Renderer:
    """Turns successive transcripts of one turn into readable text as it streams: each text part as it grows
    (prefixed by its role once), each tool call whenever its status changes, errors, and `[idle]` at the end."""

    def __init__(self) -> None:
        self._sent: dict[int, int] = {}
        self._shown: dict[int, Any] = {}
        self._open: int | None = None  # the text part whose line is not finished yet

    def feed(self, events: list[dict[str, Any]], *, final: bool = False) -> list[str]:
        """What is new in `events` (the turn's events so far) since the last call."""
        out: list[str] = []
        for i, event in enumerate(events):
            if event.get("type") == "text":
                text, done = str(event.get("text") or ""), self._sent.get(i, 0)
                if len(text) <= done:
                    continue
                if self._open != i:
                    out += ["\n"] if self._open is not None else []
                    out.append(f"{event.get('role') or 'assistant'}: ")
                    self._open = i
                out.append(text[done:])
                self._sent[i] = len(text)
                continue
            key = event.get("status") if event.get("type") == "tool" else event.get("type")
            if i in self._shown and self._shown[i] == key:
                continue
            self._shown[i] = key
            out += self._close()
            out.append(render(event) + "\n")
        if final:
            out += self._close()
        return out

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        self._open = None
        return ["\n"]


class Turn:
    """The daemon's follower of one agent session's turn: it polls opencode until the session is idle, saves the
    transcript, and streams the turn to any number of watchers, each from the turn's start: as rendered text
    (TEXT), or as its transcript events, one JSON line each once the event is final (EVENTS)."""

    TEXT = "text"
    EVENTS = "events"

    def __init__(self) -> None:
        self.chunks: dict[str, list[str]] = {self.TEXT: [], self.EVENTS: []}
        self.size: dict[str, int] = {self.TEXT: 0, self.EVENTS: 0}
        self.watchers: dict[asyncio.Queue[str | None], str] = {}
        self.task: asyncio.Task[dict[str, Any]] | None = None

    def publish(self, chunk: str, feed: str = TEXT) -> None:
        chunks = self.chunks[feed]
        chunks.append(chunk)
        self.size[feed] += len(chunk)
        while self.size[feed] > MAX_TURN_TEXT and len(chunks) > 1:  # the guest is untrusted: bound what we hold
            self.size[feed] -= len(chunks.pop(0))
        for queue, watched in list(self.watchers.items()):
            if watched != feed:
                continue
            try:
                queue.put_nowait(chunk)
            except asyncio.QueueFull:  # a watcher that cannot keep up is ended, not buffered for
                self.watchers.pop(queue, None)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(FELL_BEHIND if feed == self.TEXT else FELL_BEHIND_EVENT)
                queue.put_nowait(None)

    def watch(self, feed: str = TEXT) -> asyncio.Queue[str | None]:
        """A queue that gets the turn's feed so far, then each new chunk; None once the turn is over."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(WATCHER_BACKLOG)
        queue.put_nowait("".join(self.chunks[feed]))
        if self.task is None or self.task.done():
            queue.put_nowait(None)
        else:
            self.watchers[queue] = feed
        return queue

    def finish(self) -> None:
        for queue in list(self.watchers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self.watchers.clear()


class Conversations:
    """Opens, prompts, aborts and records agent sessions."""

    def __init__(self, agents: AgentVmService) -> None:
        self.agents = agents
        self.sessions = agents.sessions
        self._turns: dict[tuple[str, str], Turn] = {}

    async def _server(self, vm_name: str) -> tuple[VmRecord, AgentClient, str]:
        vm = self.sessions.running_vm(vm_name)
        password = self.agents.password(vm)
        return vm, await self.sessions.agent(vm), password

    async def _call(self, client: AgentClient, password: str, method: str, path: str, body: Any = None) -> Any:
        status, reply = await self.agents.http(client, password, method, path, body)
        if status not in (200, 204):
            raise BangerError(f"opencode answered {method} {path} with {status}: {str(reply)[:300]}")
        return reply

    async def open(self, vm_name: str, *, name: str | None, title: str | None) -> dict[str, Any]:
        """A new opencode session in the VM's server; returns the banger session."""
        vm, client, password = await self._server(vm_name)
        created = await self._call(client, password, "POST", "/session", {"title": title} if title else {})
        oc_id = str(created["id"])
        name = self.sessions.add_agent_session(vm, name, ["opencode", "session", oc_id], {"opencode_session": oc_id})
        self._save(vm, name, [])
        return self.sessions.to_json(self.sessions.get(vm, name), vm.name)

    def _record(self, vm: VmRecord, name: str) -> tuple[SessionRecord, str]:
        rec = self.sessions.get(vm, name)
        oc_id = rec.meta.get("opencode_session")
        if rec.kind != "agent" or not oc_id:
            raise InvalidInputError(f"session {name} is not an agent session")
        return rec, str(oc_id)

    async def prompt(
        self, vm_name: str, name: str, text: str, *, wait: bool, emit: Emit | None = None
    ) -> dict[str, Any]:
        """Send a prompt. The daemon follows the turn whether or not the caller waits (so its transcript is kept);
        with wait, the turn's text streams to `emit` and this returns once the agent is idle (`error` set when
        the turn failed). Cancelling a waiting call aborts the turn."""
        vm, client, password = await self._server(vm_name)
        rec, oc_id = self._record(vm, name)
        if rec.state != RUNNING:
            raise InvalidInputError(f"session {name} is {rec.state}")
        before = await self._messages(client, password, oc_id)
        body = {"parts": [{"type": "text", "text": text}]}
        await self._call(client, password, "POST", f"/session/{oc_id}/prompt_async", body)
        key = (vm.id, name)
        old = self._turns.get(key)
        if old is not None and old.task is not None and not old.task.done():
            old.task.cancel()  # the new turn's follower sees the old turn's messages too
        turn = self._turns[key] = Turn()
        turn.task = asyncio.get_running_loop().create_task(
            self._follow(turn, vm, name, client, password, oc_id, len(before))
        )
        turn.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if not wait:
            return {"sent": True}
        queue = turn.watch()
        try:
            while (chunk := await queue.get()) is not None:
                if chunk and emit is not None:
                    await emit(chunk)
            return await asyncio.shield(turn.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is None or not me.cancelling():  # not us: a newer prompt took the turn over
                return {"idle": False, "error": "a newer prompt took this turn over"}
            # Ctrl-C on a waiting CLI aborts the turn (shielded: the abort must go out even though we are cancelled).
            await asyncio.shield(self._call(client, password, "POST", f"/session/{oc_id}/abort", {}))
            raise
        finally:
            turn.watchers.pop(queue, None)

    async def follow(self, vm_name: str, name: str, emit: Emit, *, events: bool = False) -> bool:
        """The turn in flight as it streams, from its start, as rendered text or (events) JSON Lines; False when
        no turn was in flight (a finished turn is in the saved transcript)."""
        vm = self.sessions.vms.get(vm_name)
        turn = self._turns.get((vm.id, name))
        if turn is None or turn.task is None or turn.task.done():
            return False
        queue = turn.watch(Turn.EVENTS if events else Turn.TEXT)
        try:
            while (chunk := await queue.get()) is not None:
                if chunk:
                    await emit(chunk)
        finally:
            turn.watchers.pop(queue, None)
        return True

    async def _messages(self, client: AgentClient, password: str, oc_id: str) -> list[dict[str, Any]]:
        reply = await self._call(client, password, "GET", f"/session/{oc_id}/message")
        return reply if isinstance(reply, list) else []

    async def _follow(
        self,
        turn: Turn,
        vm: VmRecord,
        name: str,
        client: AgentClient,
        password: str,
        oc_id: str,
        known: int,
    ) -> dict[str, Any]:
        """The turn's follower: polls until the agent is idle, publishing the turn as it streams; its watchers are
        told when it is over, however it ends."""
        try:
            base = len(transcript((await self._messages(client, password, oc_id))[:known]))
            renderer = Renderer()
            final = 0  # this turn's events already published as JSON lines
            failures = 0
            while True:
                await asyncio.sleep(POLL)
                try:
                    status = await self._call(client, password, "GET", "/session/status")
                    messages = await self._messages(client, password, oc_id)
                except BangerError as exc:
                    # A busy agent in an emulated guest can miss a poll's deadline; only a run of failures counts.
                    failures += 1
                    if failures >= POLL_FAILURES:
                        raise
                    log.info("vm %s: session %s: poll failed (%s); polling again", vm.name, name, exc)
                    continue
                failures = 0
                busy = isinstance(status, dict) and (status.get(oc_id) or {}).get("type") not in (None, "idle")
                events = transcript(messages)
                # Idle by the status, confirmed by the messages: the newest message is an assistant message written
                # after our prompt (so not the previous turn's answer), and it completed or failed.
                last = messages[-1] if len(messages) > known + 1 else {}
                info = last.get("info") or {}
                finished = info.get("role") == "assistant" and bool(
                    (info.get("time") or {}).get("completed") or info.get("error")
                )
                done = not busy and finished
                if done:
                    events.append({"type": "idle", "time": int(time.time() * 1000)})
                for chunk in renderer.feed(events[base:], final=done):
                    turn.publish(chunk)
                ours = events[base:]
                while final < len(ours) and (done or _final(ours[final], final == len(ours) - 1)):
                    turn.publish(json.dumps(ours[final]) + "\n", Turn.EVENTS)
                    final += 1
                if not done:
                    continue
                self._save(vm, name, self._kept(vm, name, events[:base]) + events[base:])
                error = info.get("error")
                message = transcript([{"info": {"error": error}}])[0]["message"] if error else None
                return {"idle": True, "error": message}
        finally:
            turn.finish()

    async def abort(self, vm_name: str, name: str) -> dict[str, Any]:
        """Abort the running turn of an agent session."""
        vm, client, password = await self._server(vm_name)
        _, oc_id = self._record(vm, name)
        await self._call(client, password, "POST", f"/session/{oc_id}/abort", {})
        return self.sessions.to_json(self.sessions.get(vm, name), vm.name)

    def _kept(self, vm: VmRecord, name: str, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The earlier turns' events as kept, with the `idle` that ended each of them (opencode's messages do not
        hold those); the messages' view alone when the kept transcript no longer matches them."""
        try:
            kept = self.events(vm.name, name)
        except (BangerError, ValueError):  # no record, or a kept log whose oldest lines were dropped
            return earlier
        return kept if [e for e in kept if e.get("type") != "idle"] == earlier else earlier

    def _save(self, vm: VmRecord, name: str, events: list[dict[str, Any]]) -> None:
        """Replace the session's host log with the transcript as JSON Lines."""
        path = self.sessions.log_path(vm.id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".new")
        tmp.unlink(missing_ok=True)
        log = BoundedLog(tmp, self.sessions._max_bytes())
        try:
            log.append(b"".join(json.dumps(e).encode() + b"\n" for e in events))
        finally:
            log.close()
        tmp.replace(path)

    def events(self, vm_name: str, name: str) -> list[dict[str, Any]]:
        """The transcript the daemon kept (readable with the VM stopped)."""
        vm = self.sessions.vms.get(vm_name)
        self._record(vm, name)
        reader = LogReader(self.sessions.log_path(vm.id, name))
        data, offset = bytearray(), 0
        try:
            while True:
                start, chunk = reader.read(offset, 1 << 20)
                if not chunk:
                    break
                data += chunk
                offset = start + len(chunk)
        finally:
            reader.close()
        return [json.loads(line) for line in bytes(data).splitlines() if line.strip()]
