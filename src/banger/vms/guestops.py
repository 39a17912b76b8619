"""Operations inside a running VM through its agent: exec with streamed stdio, copy, ports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from banger.errors import InvalidInputError, ToolError
from banger.guest.client import AgentClient
from banger.vms.agents import AgentEndpoint
from banger.vms.model import VmState
from banger.vms.service import VmService
from banger.vms.staging import StagingJournal

# Sends one event to the CLI and returns once the connection has room again: a slow reader then slows the
# guest process (the agent's window is acknowledged only after this), instead of growing the daemon's buffers.
Emit = Callable[[dict[str, Any]], Awaitable[None]]


async def agent_for(vms: VmService, name: str) -> AgentClient:
    """The agent of a running VM (a clear error when it is not running)."""
    vm = vms.get(name)
    if vm.state is not VmState.RUNNING or not vm.runtime:
        raise InvalidInputError(f"VM {vm.name} is {vm.state.value}, not running", hint=f"banger vm start {vm.name}")
    return await vms.agents.get(vm.id, AgentEndpoint.from_runtime(vm.runtime), 30.0)


async def exec_streaming(
    client: AgentClient,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    user: str | None,
    tty: bool,
    rows: int,
    cols: int,
    stdin: bool,
    inbox: asyncio.Queue[dict[str, Any]],
    emit: Emit,
    ack_input: bool = False,
) -> dict[str, Any]:
    """Run argv in the guest: output chunks go to `emit`, `$/input` messages from the CLI feed stdin/resize/signals
    (with ack_input, each data chunk is acknowledged with `{"ack": N}` once the guest's stream has taken it)."""
    if not argv:
        raise InvalidInputError("no command given")

    def sink(fd: int) -> Callable[[bytes], Awaitable[None]]:
        return lambda data: emit({"fd": fd, "data": base64.b64encode(data).decode()})

    handle = await client.start_exec(
        argv, env=env, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols, stdout=sink(1), stderr=sink(2)
    )
    if not stdin:
        await handle.close_stdin()  # no -i: the command reads end of input, it does not wait for any

    async def pump_input() -> None:
        while True:
            msg = await inbox.get()
            if "data" in msg:
                data = base64.b64decode(msg["data"])
                await handle.write(data)
                if ack_input:
                    await emit({"ack": len(data)})
            if msg.get("eof"):
                await handle.close_stdin()
            if "resize" in msg:
                rows_, cols_ = msg["resize"]
                await handle.resize(int(rows_), int(cols_))
            if "signal" in msg:
                await handle.signal(int(msg["signal"]))

    feeder = asyncio.create_task(pump_input())
    try:
        status = await handle.wait()
    except BaseException:
        await handle.cancel()
        raise
    finally:
        feeder.cancel()
        with contextlib.suppress(BaseException):
            await feeder
    return {"exit_code": status.exit_code, "signal": status.signal}


async def relay_console(socket_path: Path, inbox: asyncio.Queue[dict[str, Any]], emit: Emit) -> dict[str, Any]:
    """Bridge the VM's serial console socket to a CLI call: output as events, `$/input` data to the guest."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError as exc:
        raise InvalidInputError(f"the VM's serial console is not available: {exc.strerror}") from exc

    async def pump_in() -> None:
        while True:
            msg = await inbox.get()
            if "data" in msg:
                writer.write(base64.b64decode(msg["data"]))
                await writer.drain()

    feeder = asyncio.create_task(pump_in())
    try:
        while chunk := await reader.read(65536):
            await emit({"fd": 1, "data": base64.b64encode(chunk).decode()})
        return {"closed": True}
    finally:
        feeder.cancel()
        with contextlib.suppress(BaseException):
            await feeder
        writer.close()


async def copy_out(
    client: AgentClient, src: str, dest: str, uid: int, gid: int, journal: StagingJournal | None = None
) -> Path:
    """Copy a guest path to the host for a caller, merged into what is there, and owned by the caller.

    The staged copy is given to the caller before it is merged in, so files the copy does not replace keep their
    owners, and a failing chown is an error rather than a root-owned file left in the caller's directory.
    """
    owner = (uid, gid) if os.geteuid() == 0 and uid != 0 else None
    try:
        return await client.get(src, dest, owner=owner, journal=journal)
    except OSError as exc:
        raise ToolError(f"cannot write {dest}: {exc.strerror or exc}") from exc


# The most one `vm logs -f` turn reads of the console log.
LOG_SLICE = 1 << 20


def read_slice(path: Path, offset: int, length: int) -> bytes:
    """Up to `length` bytes (at most LOG_SLICE) of `path` from `offset` (blocking: call it in a thread)."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(min(length, LOG_SLICE))
