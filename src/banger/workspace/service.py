"""The workspace service: owns the `workspaces` table and moves workspace bytes between the CLI and a guest.

The daemon never runs git on the host and never opens the user's checkout: the CLI (as the user) makes the bundle
and streams it in; the daemon pipes it to the guest agent, where the guest's git clones it. Going out, the guest's
git makes a bundle and the daemon streams its bytes back to the CLI, bounded.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from banger.errors import AlreadyExistsError, BangerError, InvalidInputError, NotFoundError
from banger.guest.client import AgentClient
from banger.progress import Progress, ProgressEvent, no_progress
from banger.store.db import Store
from banger.vms import guestops
from banger.vms.service import VmService
from banger.workspace import guestscripts as gs

log = logging.getLogger("banger.workspace")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
BASENAME_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
DEFAULT_USER = "root"
SCRIPT_TIMEOUT = 1800.0
# What the host accepts from a guest: summary lines, error text and the bundle itself are bounded.
MAX_SUMMARY = 4 * 1024 * 1024
MAX_STDERR = 64 * 1024
MAX_BUNDLE = 8 * 1024 * 1024 * 1024


class WorkspaceError(BangerError):
    """A workspace step failed in the guest."""


class _NothingCreated(WorkspaceError):
    """The guest refused before it created anything (no git, or the path exists): nothing to clean up."""


@dataclass(frozen=True)
class Workspace:
    """A VM's workspace: where it came from on the host, where it lives in the guest, and its base commit."""

    vm_id: str
    host_path: str
    guest_path: str
    guest_user: str
    base_commit: str
    base_ref: str
    head_commit: str
    branch: str | None
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "host_path": self.host_path,
            "guest_path": self.guest_path,
            "base_commit": self.base_commit,
            "base_ref": self.base_ref,
            "head_commit": self.head_commit,
            "branch": self.branch,
            "user": self.guest_user,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Summary:
    """What the guest's work amounts to, against the base."""

    tip: str
    commits_ahead: int
    changes: list[tuple[str, str]]

    def to_json(self) -> dict[str, Any]:
        return {
            "tip": self.tip,
            "commits_ahead": self.commits_ahead,
            "changed_files": len(self.changes),
            "changes": [{"status": s, "path": p} for s, p in self.changes],
        }


class _Bounded:
    """An output sink that refuses more than `limit` bytes (the guest decides how much it writes)."""

    def __init__(self, limit: int, what: str) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.what = what

    def __call__(self, data: bytes) -> None:
        if len(self.buf) + len(data) > self.limit:
            raise WorkspaceError(f"the guest's {self.what} exceeded {self.limit} bytes")
        self.buf += data

    def text(self) -> str:
        return self.buf.decode(errors="replace")


def guest_path_for(basename: str) -> str:
    """`/workspace/<basename>`, refusing names that are not one plain path component."""
    if not BASENAME_RE.fullmatch(basename) or basename in (".", "..") or basename.startswith(".banger"):
        raise InvalidInputError(f"cannot name a workspace {basename!r}: use letters, digits, '.', '_', '+', '-'")
    return f"{gs.WORKSPACE_ROOT}/{basename}"


def _failure(what: str, err: _Bounded, status: Any) -> WorkspaceError:
    tail = " | ".join(err.text().strip().splitlines()[-3:]) or f"exit status {status.exit_code}"
    return WorkspaceError(f"{what} failed in the guest: {tail}")


class WorkspaceService:
    """One row per VM that has a workspace; the rows go with their VM (ON DELETE CASCADE)."""

    def __init__(self, store: Store, vms: VmService) -> None:
        self.store = store
        self.vms = vms

    def get(self, vm_id: str) -> Workspace | None:
        """The workspace of a VM, by id, if it has one."""
        row = self.store.one("SELECT * FROM workspaces WHERE vm_id=?", (vm_id,))
        return Workspace(**dict(row)) if row is not None else None

    def of(self, name: str) -> Workspace:
        """The workspace of VM `name` (a clear error when it has none)."""
        vm = self.vms.get(name)
        ws = self.get(vm.id)
        if ws is None:
            raise NotFoundError(
                f"VM {vm.name} has no workspace", hint="create one with `banger vm create --workspace PATH`"
            )
        return ws

    def default_cwd(self, name: str) -> str | None:
        """Where exec and shell start in VM `name`: its workspace, if it has one."""
        try:
            vm = self.vms.get(name)
        except NotFoundError:
            return None
        ws = self.get(vm.id)
        return ws.guest_path if ws else None

    async def _script(self, client: AgentClient, what: str, argv: list[str], user: str) -> str:
        out, err = _Bounded(MAX_SUMMARY, "output"), _Bounded(MAX_STDERR, "error output")
        status = await client.exec(argv, user=user, stdout=out, stderr=err, timeout=SCRIPT_TIMEOUT)
        if not status.ok:
            raise _failure(what, err, status)
        return out.text()

    async def import_(
        self,
        name: str,
        *,
        basename: str,
        host_path: str,
        base_commit: str,
        base_ref: str,
        head_commit: str,
        branch: str | None,
        size: int,
        git_name: str,
        git_email: str,
        user: str | None,
        inbox: asyncio.Queue[dict[str, Any]],
        ack: Callable[[int], None],
        progress: Progress = no_progress,
    ) -> Workspace:
        """Receive a bundle from the CLI (`$/input` chunks, acknowledged as they reach the guest) and clone it."""
        for sha in (base_commit, head_commit):
            if not SHA_RE.fullmatch(sha):
                raise InvalidInputError(f"not a commit id: {sha!r}")
        vm = self.vms.get(name)
        if self.get(vm.id) is not None:
            raise AlreadyExistsError(f"VM {vm.name} already has a workspace")
        dest = guest_path_for(basename)
        guest_user = user or DEFAULT_USER
        client = await guestops.agent_for(self.vms, name)
        progress(ProgressEvent(step="workspace", message=f"receiving {size} bytes for {dest}"))
        bundle = ""
        try:
            bundle = await self._receive(client, guest_user, dest, size, inbox, ack)
            progress(ProgressEvent(step="workspace", message=f"checking out {dest} in the guest"))
            argv = gs.argv(gs.CLONE, dest, bundle, base_ref, head_commit, branch or "", git_name, git_email)
            await self._script(client, "cloning the workspace", argv, guest_user)
        except BaseException as exc:
            # Nothing half-made stays in the guest (unless it was there before: RECEIVE refuses existing paths).
            if not isinstance(exc, _NothingCreated):
                await asyncio.shield(self._cleanup(client, dest, bundle))
            raise
        ws = Workspace(
            vm_id=vm.id,
            host_path=host_path,
            guest_path=dest,
            guest_user=guest_user,
            base_commit=base_commit,
            base_ref=base_ref,
            head_commit=head_commit,
            branch=branch,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.store.execute(
            "INSERT INTO workspaces (vm_id, host_path, guest_path, guest_user, base_commit, base_ref, head_commit, "
            "branch, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (vm.id, host_path, dest, guest_user, base_commit, base_ref, head_commit, branch, ws.created_at),
        )
        log.info("workspace of %s: %s -> %s (base %s)", vm.name, host_path, dest, base_commit)
        return ws

    async def _cleanup(self, client: AgentClient, dest: str, bundle: str) -> None:
        try:
            await client.exec(gs.argv(gs.CLEANUP, dest, bundle), user="root", timeout=120)
        except BangerError as exc:
            log.warning("workspace: could not clean up %s in the guest: %s", dest, exc)

    async def _receive(
        self,
        client: AgentClient,
        user: str,
        dest: str,
        size: int,
        inbox: asyncio.Queue[dict[str, Any]],
        ack: Callable[[int], None],
    ) -> str:
        out, err = _Bounded(4096, "output"), _Bounded(MAX_STDERR, "error output")
        handle = await client.start_exec(gs.argv(gs.RECEIVE, user, dest), user="root", stdout=out, stderr=err)
        received = 0
        try:
            while True:
                msg = await inbox.get()
                if "data" in msg:
                    chunk = base64.b64decode(msg["data"])
                    received += len(chunk)
                    if received > size:
                        raise InvalidInputError(f"the CLI sent more than the announced {size} bytes")
                    await handle.write(chunk)
                    ack(received)
                if msg.get("eof"):
                    break
            if received != size:
                raise InvalidInputError(f"the upload ended after {received} of {size} bytes")
            await handle.close_stdin()
            status = await asyncio.wait_for(handle.wait(), SCRIPT_TIMEOUT)
        except BaseException:
            await handle.cancel()
            raise
        if not status.ok:
            failure = _failure("receiving the workspace", err, status)
            if status.exit_code in (20, 21):  # RECEIVE's own refusals, before it made anything
                raise _NothingCreated(failure.message)
            raise failure
        path = out.text().strip()
        if not path.startswith(gs.INBOX + "/") or "\n" in path:
            raise WorkspaceError("the guest did not say where it stored the workspace bundle")
        return path

    async def summary(self, name: str) -> tuple[Workspace, Summary]:
        """Commit the guest's uncommitted work (in the guest, temporary index) and describe it against the base."""
        ws = self.of(name)
        client = await guestops.agent_for(self.vms, name)
        argv = gs.argv(gs.PREPARE, ws.guest_path, ws.base_commit, ws.head_commit)
        text = await self._script(client, "reading the workspace", argv, ws.guest_user)
        tip, ahead, changes = "", 0, []
        for line in text.splitlines():
            key, _, rest = line.partition(" ")
            if key == "tip":
                tip = rest.strip()
            elif key == "ahead" and rest.strip().isdigit():
                ahead = int(rest)
            elif key == "change" and "\t" in rest:
                status, _, path = rest.partition("\t")
                changes.append((status, path))
        if not SHA_RE.fullmatch(tip):
            raise WorkspaceError("the guest did not report its workspace commit")
        return ws, Summary(tip, ahead, changes)

    async def export(self, name: str, emit: Emit) -> dict[str, Any]:
        """Stream the bundle of the guest's work to the CLI as `{"data": base64}` events; returns the summary."""
        ws, summ = await self.summary(name)
        client = await guestops.agent_for(self.vms, name)
        sent = 0
        bundled = summ.tip not in (ws.head_commit, ws.base_commit)
        if bundled:

            async def sink(data: bytes) -> None:
                nonlocal sent
                sent += len(data)
                if sent > MAX_BUNDLE:
                    raise WorkspaceError(f"the guest's bundle exceeded {MAX_BUNDLE} bytes")
                await emit({"data": base64.b64encode(data).decode()})

            err = _Bounded(MAX_STDERR, "error output")
            argv = gs.argv(gs.BUNDLE, ws.guest_path, ws.base_commit, ws.head_commit)
            status = await client.exec(argv, user=ws.guest_user, stdout=sink, stderr=err, timeout=SCRIPT_TIMEOUT)
            if not status.ok:
                raise _failure("bundling the workspace", err, status)
        return {**ws.to_json(), **summ.to_json(), "bundle": bundled, "bundle_bytes": sent}
