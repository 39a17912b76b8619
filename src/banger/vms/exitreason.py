"""Why a VMM ended on its own, as far as the guest's last console lines tell (a kernel panic, say)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

UNEXPECTED = "the VMM process exited unexpectedly"
# The console writer drains the VMM's pipe after the VMM is gone: give it this long to settle.
SETTLE_S = 2.0
_TAIL_BYTES = 16384
_MARKERS = ("Kernel panic", "kernel BUG at", "Oops:")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


async def _settled(path: Path) -> None:
    """Wait (bounded) until the console log stops growing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    last = _size(path)
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        size = _size(path)
        if size == last:
            return
        last = size


def from_console(tail: str) -> str:
    """The reason to record, given the last console lines of the boot that ended."""
    for line in reversed(tail.splitlines()[-120:]):
        if any(m in line for m in _MARKERS):
            return f"{UNEXPECTED}: the guest kernel crashed ({line.strip()[:200]})"
    return UNEXPECTED


async def unexpected_exit(console_log: Path) -> str:
    """The reason for a VMM that exited without being asked to."""
    await _settled(console_log)
    try:
        with console_log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return UNEXPECTED
    return from_console(tail)
