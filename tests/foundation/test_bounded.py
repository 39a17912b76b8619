"""Every external command is bounded in time and dies when the call that runs it is cancelled."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from banger import aio, proc
from banger.errors import ToolError


def test_a_command_without_a_timeout_still_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc, "DEFAULT_TIMEOUT", 0.5)
    began = time.monotonic()
    with pytest.raises(ToolError, match="timed out"):
        proc.run(["sleep", "30"])
    assert time.monotonic() - began < 10


def test_cancelling_in_thread_kills_its_external_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    def work() -> None:
        # The shell records its pid, then becomes the sleep (exec): that pid is the child proc.run started.
        proc.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"])

    async def main() -> float:
        task = asyncio.create_task(aio.in_thread(work))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.05)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - began

    took = asyncio.run(main())
    assert took < 5, f"the cancelled call took {took:.1f}s to end"
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_cancelled_thread_work_is_waited_for_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure-Python thread work cannot be interrupted: the cancelled call stops waiting after CANCEL_GRACE."""
    monkeypatch.setattr(aio, "CANCEL_GRACE", 0.5)

    async def main() -> float:
        task = asyncio.create_task(aio.in_thread(time.sleep, 5))
        await asyncio.sleep(0.2)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - began

    assert asyncio.run(main()) < 3


def test_cancelling_cancellable_thread_work_kills_its_command_too() -> None:
    """Image builds run through in_thread_cancellable: their cp -a or mkfs dies with the call."""
    seen: dict[str, bool] = {}

    def work(cancel: threading.Event) -> None:
        try:
            proc.run(["sleep", "60"])
        finally:
            seen["cancel_set"] = cancel.is_set()

    async def main() -> float:
        task = asyncio.create_task(aio.in_thread_cancellable(work))
        await asyncio.sleep(0.5)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - began

    assert asyncio.run(main()) < 5
    assert seen == {"cancel_set": True}
