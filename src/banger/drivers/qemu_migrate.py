"""QEMU snapshots: guest RAM that can be saved and shared, device state saved to and loaded from a file by fd.

QEMU 7.2 has no `file:` migration URI and `exec:` would spawn a shell, so the daemon opens the state file
itself and hands the descriptor to QEMU over QMP (SCM_RIGHTS + `getfd`), then migrates to or from `fd:NAME`.

Guest RAM lives in a shared memfd from boot, so that `x-ignore-shared` leaves it out of the migration stream:
the stream holds only device state (a few MiB) and the RAM is copied, holes skipped, from the memfd while the
guest is paused. A restore maps that RAM image privately (copy-on-write): every clone of one snapshot shares
its unchanged pages through the page cache, and nothing of a clone's writes reaches the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from qemu.qmp import QMPClient, QMPError

from banger.drivers import process, qmpconnect
from banger.drivers.base import RestoreFrom, VmmHandle, VmSpec
from banger.errors import ToolError

# The memory backend's id: also the name of its RAM block in the migration stream, so save and restore agree.
MEMORY_ID = "mem"
# QEMU names the memfd after the backend type, not its id.
MEMFD_NAME = "/memfd:memory-backend-memfd "
MIGRATION_FD = "banger-migration"
MIGRATE_TIMEOUT = 300.0
_CAPS = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
_DONE = ("completed", "failed", "cancelled")
# QemuDriver.qmp: one command on a fresh connection.
Qmp = Callable[..., Awaitable[Any]]


def _opt(value: str | os.PathLike[str]) -> str:
    return os.fspath(value).replace(",", ",,")


def memory_args(spec: VmSpec) -> list[str]:
    """Guest RAM options: a shared memfd for a booted guest, the snapshot's RAM image mapped privately on restore."""
    size = f"size={spec.memory_mib}M"
    if spec.restore is None:
        backend = f"memory-backend-memfd,id={MEMORY_ID},{size},share=on"
        return ["-object", backend, "-machine", f"memory-backend={MEMORY_ID}"]
    backend = f"memory-backend-file,id={MEMORY_ID},{size},mem-path={_opt(spec.restore.memory)},share=off"
    # -S: once loaded the guest stays paused until the caller has set up its new identity's devices.
    return ["-object", backend, "-machine", f"memory-backend={MEMORY_ID}", "-S", "-incoming", "defer"]


@contextlib.asynccontextmanager
async def _session(handle: VmmHandle, what: str, timeout: float) -> AsyncIterator[QMPClient]:
    """One QMP connection for a sequence of commands (an fd passed with `getfd` belongs to that monitor)."""
    client: QMPClient | None = None
    try:
        async with process.deadline(timeout, f"{what} on qemu pid {handle.pid}"):
            try:
                client = await qmpconnect.connect(f"banger-migrate-{handle.pid}", os.fspath(handle.control_socket))
                yield client
            except (QMPError, OSError) as exc:
                raise ToolError(f"{what} failed on qemu pid {handle.pid}: {exc}") from exc
    finally:
        if client is not None:
            with contextlib.suppress(QMPError, OSError):
                await client.disconnect()


async def _pass_fd(client: QMPClient, fd: int) -> None:
    client.send_fd_scm(fd)
    await client.execute("getfd", {"fdname": MIGRATION_FD})


async def _wait_migration(client: QMPClient) -> dict[str, Any]:
    delay = 0.01
    while True:
        info = cast(dict[str, Any], await client.execute("query-migrate"))
        status = info.get("status")
        if status in _DONE:
            if status != "completed":
                raise ToolError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            return info
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def save_state(handle: VmmHandle, dest: Path, timeout: float = MIGRATE_TIMEOUT) -> dict[str, Any]:
    """Write the device state of a paused guest to `dest` (guest RAM excluded: see `copy_guest_memory`)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        async with _session(handle, "saving the machine state", timeout) as client:
            await client.execute("migrate-set-capabilities", _CAPS)
            # The default bandwidth cap (128 MiB/s) would only slow down a stream that goes to a local file.
            await client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            await _pass_fd(client, fd)
            await client.execute("migrate", {"uri": f"fd:{MIGRATION_FD}"})
            return await _wait_migration(client)
    finally:
        os.close(fd)


async def load_state(handle: VmmHandle, restore: RestoreFrom, timeout: float = MIGRATE_TIMEOUT) -> None:
    """Load saved device state into a QEMU started with `memory_args` of a restore; the guest stays paused."""
    try:
        fd = os.open(restore.state, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ToolError(f"cannot open the saved machine state {restore.state}: {exc.strerror}") from exc
    try:
        async with _session(handle, "loading the machine state", timeout) as client:
            await client.execute("migrate-set-capabilities", _CAPS)
            await _pass_fd(client, fd)
            await client.execute("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})
            await _wait_migration(client)
    finally:
        os.close(fd)


def find_memory_fd(pid: int) -> Path:
    """The /proc path of a QEMU process's guest-RAM memfd."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError as exc:
        raise ToolError(f"cannot list the descriptors of qemu pid {pid}: {exc.strerror}") from exc
    for entry in entries:
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith(MEMFD_NAME):
                return entry
    raise ToolError(
        f"qemu pid {pid} has no guest-RAM memfd",
        hint="the VM was started before banger kept guest RAM in a memfd: restart it, then snapshot",
    )


def copy_guest_memory(pid: int, dest: Path, size: int, *, private_ok: bool = False) -> int:
    """Copy the guest RAM of a paused QEMU to a sparse file of `size` bytes; return the bytes copied.

    Only the memfd's data extents are copied (SEEK_DATA/SEEK_HOLE): pages the guest never touched stay holes.
    A guest resumed from a snapshot and never rebooted has no memfd (`private_ok`): its RAM is a private
    mapping, which x-ignore-shared does not leave out, so it went into the state stream and `dest` is only a
    sparse file of zeros that a restore maps and the stream fills (its clones then share no pages).
    """
    try:
        memfd = find_memory_fd(pid)
    except ToolError:
        if not private_ok:
            raise
        with open(dest, "wb") as f:
            f.truncate(size)
        return 0
    src = os.open(memfd, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(out, size)
            return _copy_extents(src, out, size)
        finally:
            os.close(out)
    finally:
        os.close(src)


def _copy_extents(src: int, out: int, size: int) -> int:
    copied = 0
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            raise
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        os.lseek(out, start, os.SEEK_SET)
        pos = start
        while pos < end:
            sent = os.sendfile(out, src, pos, min(end - pos, 1 << 30))
            if sent == 0:
                raise ToolError("guest RAM ended early while copying it")
            pos += sent
        copied += end - start
        offset = end
    return copied


async def freeze_disk(qmp: Qmp, handle: VmmHandle, device: str, overlay: Path) -> None:
    """Redirect the guest's writes to a new qcow2 overlay, so the file under it stays as it is now (a paused guest)."""
    await qmp(handle, "blockdev-snapshot-sync", {"device": device, "snapshot-file": str(overlay), "format": "qcow2"})


async def thaw_disk(qmp: Qmp, handle: VmmHandle, device: str, base: Path, timeout: float = MIGRATE_TIMEOUT) -> None:
    """Fold the overlay of `freeze_disk` back into `base` (an active block-commit) and run on `base` again."""
    job = f"banger-commit-{device}"
    # `base` is required: by default the commit goes down to the bottom of the chain, which for a clone is the
    # snapshot's disk that its siblings share.
    await qmp(handle, "block-commit", {"device": device, "job-id": job, "base": str(base)})
    async with process.deadline(timeout, f"folding the write overlay of {device} back into {base.name}"):
        delay = 0.01
        while True:
            jobs = {j["device"]: j for j in await qmp(handle, "query-block-jobs")}
            if job not in jobs:
                break
            if jobs[job].get("ready") and jobs[job].get("status") == "ready":
                await qmp(handle, "block-job-complete", {"device": job})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
    for block in await qmp(handle, "query-block"):
        if block.get("device") == device:
            current = (block.get("inserted") or {}).get("file")
            if current is not None and current.startswith("/dev/fd/"):
                # A confined QEMU (drivers/confine.py) was handed its disks as descriptors: see what this one is.
                with contextlib.suppress(OSError):
                    current = os.readlink(f"/proc/{handle.pid}/fd/{current.removeprefix('/dev/fd/')}")
            if current != str(base):
                raise ToolError(f"{device} still runs on {current} after folding its write overlay into {base}")
