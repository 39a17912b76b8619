"""`vm logs -f` follows the console log across the writer's rotations, losing and repeating nothing."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from banger.drivers.consolelog import RotatingLog
from banger.vms import consolefollow


def test_follow_crosses_rotations_in_order(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = RotatingLog(path, 256 * 1024)  # halves of 128 KiB: the lines below rotate it a few times
    lines = [f"line {i:05d} ".encode() + b"x" * 200 + b"\n" for i in range(1500)]

    async def main() -> str:
        got: list[str] = []
        total = sum(len(line) for line in lines)

        async def emit(text: str) -> None:
            got.append(text)
            await asyncio.sleep(0)  # a client that takes a moment per event

        follower = asyncio.create_task(consolefollow.follow(path, emit))
        await asyncio.sleep(0.3)
        for i, line in enumerate(lines):
            log.write(line)
            if i % 100 == 0:
                await asyncio.sleep(0.05)  # the follower catches up now and then, rotations happen in between
        for _ in range(200):
            if sum(len(t) for t in got) >= total:
                break
            await asyncio.sleep(0.05)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        return "".join(got)

    text = asyncio.run(main())
    log.close()
    assert text == b"".join(lines).decode()


def test_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "console.log"

    async def main() -> str:
        got: list[str] = []

        async def emit(text: str) -> None:
            got.append(text)

        follower = asyncio.create_task(consolefollow.follow(path, emit))
        await asyncio.sleep(0.3)
        path.write_text("first boot line\n")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        return "".join(got)

    assert asyncio.run(main()) == "first boot line\n"


def test_tail_reaches_into_the_rotated_half(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    consolefollow.rotated(path).write_text("".join(f"old {i}\n" for i in range(10)))
    path.write_text("new 0\nnew 1\n")
    assert consolefollow.tail(path, 4) == "old 8\nold 9\nnew 0\nnew 1"
    assert consolefollow.tail(path, 1) == "new 1"
    assert consolefollow.tail(path, 5, since=6) == "new 1"  # this boot's lines only
