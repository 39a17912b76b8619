"""The session service: the `sessions` table, a host copy of every session's output, and the guest calls.

A session is owned by its supervisor in the guest (guest/sessions.py). The daemon records it, and while the VM
runs a mirror task per session streams its output from the guest's log into a bounded copy on the host
(`vms/<id>/sessions/<name>.log`, the same BoundedLog format and logical offsets as the guest's), resuming from
the copy's end after a daemon restart or an agent reconnect. So `session logs` works after the VM stopped and
after the daemon restarted, and no byte is copied twice. When a VM starts (or is re-adopted) its sessions are
re-listed from the guest; when it stops, its running sessions become `lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from banger.config import Settings
from banger.errors import AlreadyExistsError, BangerError, InvalidInputError, NotFoundError
from banger.guest.client import AgentClient, AgentError
from banger.guest.sessionlog import HEADER_LEN, BoundedLog, LogReader, read_header
from banger.names import generate_name, validate_name
from banger.sessions import guestapi
from banger.sessions.guestapi import GuestSession
from banger.sessions.model import LOST, RUNNING, SessionRecord, iso, now
from banger.store.db import Store
from banger.vms.agents import AgentEndpoint
from banger.vms.model import VmRecord, VmState
from banger.vms.service import VmService

log = logging.getLogger("banger.sessions")

MIRROR_RETRY = 1.0
SYNC_TIMEOUT = 30.0
Emit = Callable[[dict[str, Any]], Awaitable[None]]
T = TypeVar("T")


# The most earlier output an attach replays (see `attach`).
MAX_REPLAY = 1 << 20


class SessionService:
    """Owns the sessions table and the host copies of session output."""

    def __init__(self, settings: Settings, store: Store, vms: VmService) -> None:
        self.settings = settings
        self.store = store
        self.vms = vms
        self._mirrors: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._resumers: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[tuple[str, str], asyncio.Event] = {}
        vms.state_listeners.append(self._vm_changed)

    # -- records -----------------------------------------------------------------------------------------------

    def log_path(self, vm_id: str, name: str) -> Path:
        return self.vms.vm_dir(vm_id) / "sessions" / f"{name}.log"

    def _max_bytes(self) -> int:
        return int(self.settings.get("session_log_max_mib")) << 20

    def get(self, vm: VmRecord, name: str) -> SessionRecord:
        row = self.store.one("SELECT * FROM sessions WHERE vm_id=? AND name=?", (vm.id, name))
        if row is None:
            raise NotFoundError(f"no session named {name!r} in VM {vm.name}", hint=f"see `banger session ls {vm.name}`")
        return SessionRecord.from_row(row)

    def _rows(self, vm_id: str | None = None) -> list[SessionRecord]:
        if vm_id is None:
            rows = self.store.query("SELECT * FROM sessions ORDER BY started_at, name")
        else:
            rows = self.store.query("SELECT * FROM sessions WHERE vm_id=? ORDER BY started_at, name", (vm_id,))
        return [SessionRecord.from_row(r) for r in rows]

    def host_end(self, vm_id: str, name: str) -> tuple[int, int]:
        """(first kept offset, end offset) of the host copy."""
        try:
            with open(self.log_path(vm_id, name), "rb") as f:
                dropped = read_header(f.fileno())
                return dropped, dropped + os.fstat(f.fileno()).st_size - HEADER_LEN
        except (OSError, ValueError):
            return 0, 0

    def to_json(self, rec: SessionRecord, vm_name: str) -> dict[str, Any]:
        """The public view (CLI --json)."""
        return {
            "vm": vm_name,
            "name": rec.name,
            "kind": rec.kind,
            "command": rec.command,
            "tty": rec.tty,
            "restart": rec.restart,
            "state": rec.state,
            "exit_code": rec.exit_code,
            "signal": rec.signal,
            "started_at": rec.started_at,
            "ended_at": rec.ended_at,
            "output_bytes": self.host_end(rec.vm_id, rec.name)[1],
            "restarts": rec.restarts,
        }

    def _update(self, vm_id: str, gs: GuestSession) -> None:
        """Record what the guest says about a session."""
        self.store.execute(
            "UPDATE sessions SET state=?, exit_code=?, signal=?, ended_at=COALESCE(?, ended_at), restarts=? "
            "WHERE vm_id=? AND name=?",
            (gs.state, gs.exit_code, gs.signal, iso(gs.ended_at), gs.restarts, vm_id, gs.name),
        )
        self._notify(vm_id, gs.name)

    def _insert(self, vm_id: str, gs: GuestSession) -> None:
        self.store.execute(
            "INSERT INTO sessions (vm_id, name, kind, command, tty, restart, state, exit_code, signal, started_at, "
            "ended_at, restarts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                vm_id,
                gs.name,
                gs.kind,
                json.dumps(gs.command),
                int(gs.tty),
                gs.restart,
                gs.state,
                gs.exit_code,
                gs.signal,
                iso(gs.started_at) or now(),
                iso(gs.ended_at),
                gs.restarts,
            ),
        )

    def add_agent_session(self, vm: VmRecord, name: str | None, command: list[str], meta: dict[str, Any]) -> str:
        """Record a session of kind `agent` (a conversation in the VM's agent server); returns its name."""
        taken = {r.name for r in self._rows(vm.id)}
        name = name or generate_name(taken)
        validate_name(name, "session name")
        if name in taken:
            raise AlreadyExistsError(f"VM {vm.name} has a session named {name!r} already")
        pending = GuestSession(name, "agent", command, False, "no", RUNNING, None, None, None, None, 0, 0)
        self._insert(vm.id, pending)
        self.store.execute("UPDATE sessions SET meta=? WHERE vm_id=? AND name=?", (json.dumps(meta), vm.id, name))
        return name

    def set_state(self, vm: VmRecord, name: str, state: str, *, exit_code: int | None = None) -> None:
        """Record a state reported by something other than the guest's supervisor (agent sessions)."""
        ended = now() if state != RUNNING else None
        self.store.execute(
            "UPDATE sessions SET state=?, exit_code=?, ended_at=COALESCE(?, ended_at) WHERE vm_id=? AND name=?",
            (state, exit_code, ended, vm.id, name),
        )
        self._notify(vm.id, name)

    def _notify(self, vm_id: str, name: str) -> None:
        event = self._changed.pop((vm_id, name), None)
        if event is not None:
            event.set()

    def _waiter(self, vm_id: str, name: str) -> asyncio.Event:
        return self._changed.setdefault((vm_id, name), asyncio.Event())

    # -- guest access ------------------------------------------------------------------------------------------

    def running_vm(self, name: str) -> VmRecord:
        vm = self.vms.get(name)
        if vm.state is not VmState.RUNNING or not vm.runtime:
            raise InvalidInputError(f"VM {vm.name} is {vm.state.value}, not running", hint=f"banger vm start {vm.name}")
        return vm

    async def agent(self, vm: VmRecord, timeout: float = 30.0) -> AgentClient:
        return await self.vms.agents.get(vm.id, AgentEndpoint.from_runtime(vm.runtime or {}), timeout)

    async def with_agent(self, vm: VmRecord, call: Callable[[AgentClient], Awaitable[T]]) -> T:
        """Run `call` with the VM's agent; once more on a fresh connection if the agent was restarted under it.

        A restarted agent announces itself only when it is up; until then the pooled connection looks fine, and a
        request on it fails with "disconnected" once the announcement arrives. Sessions outlive agents, so the
        request is simply made again (callers make non-idempotent requests safe to repeat).
        """
        try:
            return await call(await self.agent(vm))
        except AgentError as exc:
            if exc.data.get("agent_code") != "disconnected":
                raise
            log.info("vm %s: agent connection was reset; retrying on a new one", vm.name)
            await self.vms.agents.drop(vm.id)
            return await call(await self.agent(vm, 120.0))

    # -- operations --------------------------------------------------------------------------------------------

    async def start(
        self,
        vm_name: str,
        argv: list[str],
        *,
        name: str | None,
        env: dict[str, str],
        cwd: str | None,
        user: str | None,
        tty: bool,
        rows: int,
        cols: int,
        restart: str,
        kind: str = "process",
    ) -> dict[str, Any]:
        """Start a supervised process in the guest and begin mirroring its output."""
        if not argv:
            raise InvalidInputError("no command given", hint="banger session start VM -- CMD...")
        if restart not in ("no", "on-failure", "always"):
            raise InvalidInputError(f"unknown restart policy {restart!r} (choose no, on-failure or always)")
        vm = self.running_vm(vm_name)
        taken = {r.name for r in self._rows(vm.id)}
        name = name or generate_name(taken)
        validate_name(name, "session name")
        if name in taken:
            raise AlreadyExistsError(f"VM {vm.name} has a session named {name!r} already")
        pending = GuestSession(name, kind, argv, tty, restart, RUNNING, None, None, None, None, 0, 0)
        try:
            self._insert(vm.id, pending)  # first: a daemon killed mid-start still knows the session
        except sqlite3.IntegrityError as exc:
            raise AlreadyExistsError(f"VM {vm.name} has a session named {name!r} already") from exc
        first = True

        async def start_once(client: AgentClient) -> GuestSession:
            nonlocal first
            if not first:  # a repeat after a reset connection: the first request may have started it already
                found = {s.name: s for s in await guestapi.list_(client)}
                if name in found:
                    return found[name]
            first = False
            return await guestapi.start(
                client,
                name,
                argv,
                env=env,
                cwd=cwd,
                user=user,
                tty=tty,
                rows=rows,
                cols=cols,
                restart=restart,
                log_max_bytes=self._max_bytes(),
                kind=kind,
            )

        try:
            gs = await self.with_agent(vm, start_once)
        except BaseException:
            self.store.execute("DELETE FROM sessions WHERE vm_id=? AND name=?", (vm.id, name))
            raise
        self.store.execute(
            "UPDATE sessions SET started_at=? WHERE vm_id=? AND name=?", (iso(gs.started_at), vm.id, name)
        )
        self._update(vm.id, gs)
        self._mirror(vm.id, name)
        log.info("vm %s: session %s started: %s", vm.name, name, argv)
        return self.to_json(self.get(vm, name), vm.name)

    async def list(self, vm_name: str | None) -> list[dict[str, Any]]:
        """Sessions of one VM or of all; running VMs are asked first, so states are current."""
        vms = [self.vms.get(vm_name)] if vm_name else self.vms.all()
        out = []
        for vm in vms:
            if vm.state is VmState.RUNNING and vm.runtime and self._rows(vm.id):
                with contextlib.suppress(BangerError, OSError):
                    for gs in await self.with_agent(vm, guestapi.list_):
                        if self.store.one("SELECT 1 FROM sessions WHERE vm_id=? AND name=?", (vm.id, gs.name)):
                            self._update(vm.id, gs)
            out += [self.to_json(r, vm.name) for r in self._rows(vm.id)]
        return out

    async def logs(self, vm_name: str, name: str, *, follow: bool, emit: Emit) -> dict[str, Any]:
        """Everything the session wrote (from the host copy, caught up with the guest first); with follow, until
        the session ends."""
        vm = self.vms.get(vm_name)
        rec = self.get(vm, name)
        await self._catch_up(vm, name)
        path = self.log_path(vm.id, name)
        reader = LogReader(path)
        offset, noted = 0, False
        try:
            while True:
                waiter = self._waiter(vm.id, name)
                while True:
                    start, data = reader.read(offset, 65536)
                    if start > offset and not noted:
                        note = f"banger: {start - offset} bytes of older output were dropped (session_log_max_mib)\n"
                        await emit({"fd": 2, "data": _b64(note.encode())})
                    noted = True
                    if not data:
                        offset = start
                        break
                    await emit({"fd": 1, "data": _b64(data)})
                    offset = start + len(data)
                rec = self.get(vm, name)
                mirroring = (vm.id, name) in self._mirrors
                if not follow or (rec.state != RUNNING and not mirroring):
                    return self.to_json(rec, vm.name)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):  # a bound: the state is re-read even if no event comes
                        await waiter.wait()
        finally:
            reader.close()

    async def _catch_up(self, vm: VmRecord, name: str) -> None:
        """Wait (bounded) until the host copy holds what the guest had written when we asked."""
        if vm.state is not VmState.RUNNING or not vm.runtime:
            return
        try:
            found = {s.name: s for s in await self.with_agent(vm, guestapi.list_)}
        except (BangerError, OSError) as exc:
            log.info("vm %s: cannot ask the guest about session %s: %s", vm.name, name, exc)
            return
        gs = found.get(name)
        if gs is None:
            return
        if (vm.id, name) not in self._mirrors and self.host_end(vm.id, name)[1] < gs.output_bytes:
            self._mirror(vm.id, name)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SYNC_TIMEOUT):
                while self.host_end(vm.id, name)[1] < gs.output_bytes and (vm.id, name) in self._mirrors:
                    waiter = self._waiter(vm.id, name)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await waiter.wait()

    async def attach(
        self,
        vm_name: str,
        name: str,
        *,
        rows: int,
        cols: int,
        inbox: asyncio.Queue[dict[str, Any]],
        emit: Emit,
        replay: int = 0,
    ) -> dict[str, Any]:
        """Join a running session: its new output as events (after the last `replay` bytes it wrote before, which
        redraw a terminal that reattaches), `$/input` as its stdin and window size."""
        vm = self.running_vm(vm_name)
        rec = self.get(vm, name)
        client = await self.agent(vm)
        current = {s.name: s for s in await guestapi.list_(client)}.get(name)
        if current is None or current.state != RUNNING:
            raise InvalidInputError(f"session {name} is {current.state if current else 'gone'}, not running")
        if rec.tty:
            await guestapi.control(client, name, "resize", rows=rows, cols=cols)

        async def pump_input() -> None:
            while True:
                msg = await inbox.get()
                if "data" in msg:
                    await guestapi.send_input(client, name, _unb64(msg["data"]), eof=False)
                if msg.get("eof") and not rec.tty:
                    await guestapi.send_input(client, name, b"", eof=True)
                if "resize" in msg and rec.tty:
                    r, c = msg["resize"]
                    await guestapi.control(client, name, "resize", rows=int(r), cols=int(c))
                if "signal" in msg:
                    await guestapi.control(client, name, "signal", signal=int(msg["signal"]))

        async def sink(off: int, data: bytes) -> None:
            await emit({"fd": 1, "data": _b64(data)})

        feeder = asyncio.create_task(pump_input())
        try:
            start = max(0, current.output_bytes - max(0, min(replay, MAX_REPLAY)))
            gs = await guestapi.read(client, name, start, follow=True, sink=sink)
        finally:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
        return {"ended": True, "exit_code": gs.exit_code, "signal": gs.signal}

    async def send(self, vm_name: str, name: str, data: bytes, *, eof: bool) -> dict[str, Any]:
        """Write to a running session's stdin (then close it, with eof)."""
        vm = self.running_vm(vm_name)
        self.get(vm, name)
        await self.with_agent(vm, lambda client: guestapi.send_input(client, name, data, eof=eof))
        return {"sent": len(data), "eof": eof}

    async def stop(self, vm_name: str, name: str, *, signal: int, timeout: float) -> dict[str, Any]:
        """Signal the session (no more restarts) and wait for its end, killing it after `timeout`."""
        vm = self.vms.get(vm_name)
        rec = self.get(vm, name)
        if vm.state is VmState.RUNNING and rec.state == RUNNING:
            gs = await self.with_agent(
                vm,
                lambda client: guestapi.control(client, name, "stop", timeout + 30.0, signal=signal, timeout=timeout),
            )
            self._update(vm.id, gs)
        return self.to_json(self.get(vm, name), vm.name)

    async def remove(self, vm_name: str, name: str, *, force: bool) -> None:
        """Forget a session: the guest's copy (when the VM runs), the host's copy and the row."""
        vm = self.vms.get(vm_name)
        rec = self.get(vm, name)
        if vm.state is VmState.RUNNING and vm.runtime:
            try:
                await self.with_agent(vm, lambda client: guestapi.remove(client, name, force=force))
            except NotFoundError:
                pass  # never reached the guest, or removed there already
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"session {name} is running", hint=f"banger session stop {vm.name} {name}, or rm -f"
                ) from exc
        elif rec.state == RUNNING and not force:
            raise InvalidInputError(f"session {name} is running", hint="use rm -f")
        await self._stop_mirror(vm.id, name)
        self.store.execute("DELETE FROM sessions WHERE vm_id=? AND name=?", (vm.id, name))
        with contextlib.suppress(FileNotFoundError):
            self.log_path(vm.id, name).unlink()
        self._notify(vm.id, name)

    # -- mirroring ---------------------------------------------------------------------------------------------

    def _mirror(self, vm_id: str, name: str) -> None:
        key = (vm_id, name)
        if key not in self._mirrors:
            task = asyncio.create_task(self._mirror_task(vm_id, name), name=f"session-mirror:{vm_id}:{name}")
            self._mirrors[key] = task
            task.add_done_callback(lambda t: self._mirror_done(key, t))

    def _mirror_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._mirrors.get(key) is task:
            del self._mirrors[key]
        self._notify(*key)

    async def _stop_mirror(self, vm_id: str, name: str) -> None:
        task = self._mirrors.get((vm_id, name))
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _mirror_task(self, vm_id: str, name: str) -> None:
        """Copy the session's output from the guest until it ends (reconnecting while the VM runs)."""
        path = self.log_path(vm_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        copy = BoundedLog(path, self._max_bytes())
        try:
            while True:
                try:
                    vm = self.vms.get(vm_id)
                except NotFoundError:
                    return
                if vm.state is not VmState.RUNNING:
                    return
                try:
                    client = await self.agent(vm)

                    def sink(off: int, data: bytes) -> None:
                        if off > copy.end:  # the guest dropped bytes we never saw: say so by the offsets
                            copy.restart_at(off)
                        elif off < copy.end:  # never expected (we ask from our end), but never twice
                            data = data[copy.end - off :]
                        copy.append(data)
                        self._notify(vm_id, name)

                    gs = await guestapi.read(client, name, copy.end, follow=True, sink=sink)
                    self._update(vm_id, gs)
                    return
                except NotFoundError:
                    return  # the guest has no such session (removed, or the daemon died mid-start)
                except BangerError as exc:
                    log.info("vm %s: session %s: mirror interrupted (%s); retrying", vm.name, name, exc)
                except OSError as exc:
                    log.info("vm %s: session %s: mirror interrupted (%s); retrying", vm.name, name, exc)
                await asyncio.sleep(MIRROR_RETRY)
        finally:
            copy.close()

    # -- VM lifecycle ------------------------------------------------------------------------------------------

    def _vm_changed(self, vm: VmRecord) -> None:
        if vm.state is VmState.RUNNING:
            self._resume_soon(vm.id)
        elif vm.state in (VmState.STOPPING, VmState.STOPPED, VmState.ERROR):
            for (vm_id, _name), task in list(self._mirrors.items()):
                if vm_id == vm.id:
                    task.cancel()
            if vm.state is not VmState.STOPPING:
                self.store.execute("UPDATE sessions SET state=? WHERE vm_id=? AND state=?", (LOST, vm.id, RUNNING))
                for rec in self._rows(vm.id):
                    self._notify(vm.id, rec.name)

    def _resume_soon(self, vm_id: str) -> None:
        old = self._resumers.get(vm_id)
        if old is not None and not old.done():
            return
        self._resumers[vm_id] = asyncio.create_task(self._resume(vm_id), name=f"session-resume:{vm_id}")

    async def _resume(self, vm_id: str) -> None:
        """Bring the rows of a (re)started or re-adopted VM in line with its guest, and mirror what is missing."""
        for attempt in range(30):
            try:
                vm = self.vms.get(vm_id)
                if vm.state is not VmState.RUNNING:
                    return
                guest = {s.name: s for s in await guestapi.list_(await self.agent(vm))}
                break
            except NotFoundError:
                return
            except (BangerError, OSError) as exc:
                log.info("vm %s: cannot list its sessions yet (%s)", vm_id, exc)
                await asyncio.sleep(min(1.0 + attempt, 10.0))
        else:
            return
        known = {r.name: r for r in self._rows(vm_id)}
        for name, rec in known.items():
            # Agent sessions live in the agent's server, not under a supervisor; the guest does not list them.
            if name not in guest and rec.state == RUNNING and rec.kind != "agent":
                self.store.execute("UPDATE sessions SET state=? WHERE vm_id=? AND name=?", (LOST, vm_id, name))
                self._notify(vm_id, name)
        for name, gs in guest.items():
            if name not in known:
                if gs.state != RUNNING:  # removed here while the VM was down: finish the job in the guest
                    with contextlib.suppress(BangerError, OSError):
                        await guestapi.remove(await self.agent(vm), name, force=False)
                    continue
                self._insert(vm_id, gs)
            self._update(vm_id, gs)
            if gs.state == RUNNING or self.host_end(vm_id, name)[1] < gs.output_bytes:
                self._mirror(vm_id, name)
        log.info("vm %s: %d session(s) re-listed", vm.name, len(guest))

    async def reconcile(self) -> None:
        """At daemon start: sessions of VMs that are not running are lost; running VMs are re-listed."""
        for vm in self.vms.all():
            if vm.state is VmState.RUNNING:
                self._resume_soon(vm.id)
            else:
                self.store.execute("UPDATE sessions SET state=? WHERE vm_id=? AND state=?", (LOST, vm.id, RUNNING))

    async def close(self) -> None:
        """At daemon stop: mirrors end; sessions keep running in their guests."""
        tasks = [*self._mirrors.values(), *self._resumers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)
