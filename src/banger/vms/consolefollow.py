"""`vm logs -f`: follow a VM's console log across rotations, at the pace the client reads it."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, NoReturn

from banger.drivers.consolelog import rotated

# One event carries at most this much; the next is read only once the client has taken the last one in.
CHUNK = 64 * 1024
POLL_S = 0.25

Emit = Callable[[str], Awaitable[None]]
_TAIL_BYTES = 16384


def _read_tail(path: Path, since: int) -> bytes:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(since if since <= size else 0, size - _TAIL_BYTES))  # since > size: rotated meanwhile
            return f.read()
    except FileNotFoundError:
        return b""


def tail(path: Path, lines: int = 15, since: int = 0) -> str:
    """The last `lines` lines of a console log (from byte offset `since` on), reaching into the rotated half."""
    data = _read_tail(path, since)
    if data.count(b"\n") < lines and since == 0:
        data = _read_tail(rotated(path), 0) + data
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _open(path: Path) -> BinaryIO | None:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def _same_file(f: BinaryIO, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return True  # between the writer's rename and its new file: keep the old one
    mine = os.fstat(f.fileno())
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


async def follow(path: Path, emit: Emit, *, from_start: bool = False) -> NoReturn:
    """Send what is appended to `path` from now on (or from its start) to `emit`, awaiting each send.

    The console writer renames a full log to console.log.1 and starts a new file: the old file is read to its
    end first, then the new one from its start, so nothing written in between is lost or sent twice.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    f = _open(path)
    if f is not None and not from_start:
        f.seek(0, os.SEEK_END)
    try:
        while True:
            if f is None:
                f = _open(path)
                if f is None:
                    await asyncio.sleep(POLL_S)
                    continue
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if chunk:
                await emit(decoder.decode(chunk))
                continue
            if not _same_file(f, path):
                # Rotated. The writer may have appended to the old file after our last read and before the
                # rename: finish it, then read the new file from its start.
                while rest := await asyncio.to_thread(f.read, CHUNK):
                    await emit(decoder.decode(rest))
                older = rotated(path)
                if not _same_file(f, older):
                    # Rotated twice since we looked (a slow reader): the half in between is console.log.1 now.
                    # A reader more than a whole cap behind has lost output, which is what the cap is for.
                    f.close()
                    f = _open(older)
                    if f is not None:
                        while rest := await asyncio.to_thread(f.read, CHUNK):
                            await emit(decoder.decode(rest))
                if f is not None:
                    f.close()
                f = None
                continue
            await asyncio.sleep(POLL_S)
    finally:
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
