"""Guest sessions on the host: the real agent.py and sessions.py supervisors, driven through the real client.

The bounded log is unit-tested; everything else runs the real processes (supervisors double-fork and outlive the
agent, exactly as in a guest). Every supervisor a test starts is killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from banger import errors
from banger.guest import sessionlog
from banger.guest.client import AgentClient
from banger.sessions import guestapi

from .conftest import AgentHarness, running_agent


@pytest.fixture
def sessions_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "sessions"
    yield root
    for state in root.glob("*/state.json"):
        data = json.loads(state.read_text())
        for key in ("pid", "supervisor_pid"):
            pid = data.get(key)
            if isinstance(pid, int):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def agent(tmp_path: Path, root: Path) -> AsyncIterator[AgentHarness]:
    async with running_agent(tmp_path, "--sessions-dir", str(root)) as harness:
        yield harness


async def start(c: AgentClient, name: str, argv: list[str], **kw: object) -> guestapi.GuestSession:
    opts: dict[str, object] = dict(
        env={}, cwd=None, user=None, tty=False, rows=24, cols=80, restart="no", log_max_bytes=1 << 20
    )
    opts.update(kw)
    return await guestapi.start(c, name, argv, **opts)  # type: ignore[arg-type]


async def output(c: AgentClient, name: str, offset: int = 0, follow: bool = False) -> bytes:
    buf = bytearray()
    expected = offset

    def sink(off: int, data: bytes) -> None:
        nonlocal expected
        assert off == expected  # contiguous: nothing twice, nothing skipped
        buf.extend(data)
        expected = off + len(data)

    await guestapi.read(c, name, offset, follow=follow, sink=sink)
    return bytes(buf)


async def wait_state(c: AgentClient, name: str, state: str, timeout: float = 30) -> guestapi.GuestSession:
    async with asyncio.timeout(timeout):
        while True:
            found = {s.name: s for s in await guestapi.list_(c)}
            if found[name].state == state:
                return found[name]
            await asyncio.sleep(0.1)


def test_bounded_log_drops_oldest_and_readers_follow_rotation(tmp_path: Path) -> None:
    path = tmp_path / "output"
    log = sessionlog.BoundedLog(path, 8192)
    reader = sessionlog.LogReader(path)
    log.append(b"a" * 5000)
    assert reader.read(0, 100) == (0, b"a" * 100)
    log.append(b"b" * 5000)  # past 8192: only the newest half is kept
    assert log.end == 10000 and log.dropped == 10000 - 4096
    start, data = reader.read(100, 1 << 20)  # the reader still holds the old file: it sees all of it first
    assert (start, data) == (100, b"a" * 4900 + b"b" * 5000)
    start, data = reader.read(10000, 100)
    assert (start, data) == (10000, b"")
    start, data = sessionlog.LogReader(path).read(0, 1 << 20)
    assert start == log.dropped and data == b"b" * 4096
    reopened = sessionlog.BoundedLog(path, 8192)
    assert reopened.end == 10000
    reopened.restart_at(20000)
    assert sessionlog.LogReader(path).read(0, 10) == (20000, b"")


def test_session_runs_streams_and_takes_input(tmp_path: Path, sessions_root: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, sessions_root) as h:
            c = await h.client()
            s = await start(c, "echoer", ["sh", "-c", 'echo ready; while read l; do echo "got:$l"; done; exit 4'])
            assert s.state == "running" and s.command[0] == "sh"
            follower = asyncio.create_task(output(c, "echoer", follow=True))
            await guestapi.send_input(c, "echoer", b"one\ntwo\n", eof=True)
            out = await asyncio.wait_for(follower, 30)
            assert out == b"ready\ngot:one\ngot:two\n"
            done = await wait_state(c, "echoer", "exited")
            assert (done.exit_code, done.signal, done.output_bytes) == (4, None, len(out))
            with pytest.raises(errors.AlreadyExistsError):
                await start(c, "echoer", ["true"])
            with pytest.raises(errors.BangerError, match="command not found"):
                await start(c, "broken", ["no-such-command-here"])
            assert not (sessions_root / "broken").exists()

    asyncio.run(main())


def test_session_outlives_the_agent_and_stop_records_the_signal(tmp_path: Path, sessions_root: Path) -> None:
    async def main() -> None:
        script = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"
        async with agent(tmp_path, sessions_root) as h:
            c = await h.client()
            await start(c, "counter", ["sh", "-c", script])
            first = await output(c, "counter")
            h.proc.kill()  # the agent dies; a new one takes over below
            h.proc.wait()
        async with agent(tmp_path, sessions_root) as h:
            c = await h.client()
            listed = {s.name: s for s in await guestapi.list_(c)}
            assert listed["counter"].state == "running"
            more = await output(c, "counter")
            assert more.startswith(first) and len(more) > len(first)
            stopped = await guestapi.control(c, "counter", "stop", signal=int(signal.SIGTERM), timeout=5.0)
            assert (stopped.state, stopped.signal, stopped.exit_code) == ("exited", signal.SIGTERM, None)
            numbers = [int(x) for x in (await output(c, "counter")).split()]
            assert numbers == list(range(1, len(numbers) + 1))
            with pytest.raises(errors.BangerError, match="not running"):
                await guestapi.send_input(c, "counter", b"x", eof=False)
            await guestapi.remove(c, "counter", force=False)
            assert await guestapi.list_(c) == []

    asyncio.run(main())


def test_restart_on_failure_and_lost_supervisor(tmp_path: Path, sessions_root: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, sessions_root) as h:
            c = await h.client()
            await start(c, "flaky", ["sh", "-c", "echo run; sleep 0.3; exit 3"], restart="on-failure")
            async with asyncio.timeout(30):
                while (await output(c, "flaky")).count(b"run") < 2:
                    await asyncio.sleep(0.2)
            listed = {s.name: s for s in await guestapi.list_(c)}
            assert listed["flaky"].state == "running" and listed["flaky"].restarts >= 1
            await start(c, "victim", ["sleep", "600"])
            state = json.loads((sessions_root / "victim" / "state.json").read_text())
            os.kill(state["supervisor_pid"], signal.SIGKILL)
            os.kill(state["pid"], signal.SIGKILL)
            await wait_state(c, "victim", "lost")
            with pytest.raises(errors.BangerError, match="running"):
                await guestapi.remove(c, "flaky", force=False)
            await guestapi.remove(c, "flaky", force=True)
            assert [s.name for s in await guestapi.list_(c)] == ["victim"]

    asyncio.run(main())


def test_tty_session_resizes_and_many_watchers(tmp_path: Path, sessions_root: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, sessions_root) as h:
            c = await h.client()
            await start(c, "term", ["sh", "-c", "stty size; read x; stty size"], tty=True, rows=30, cols=90)
            watchers = [asyncio.create_task(output(c, "term", follow=True)) for _ in range(3)]
            async with asyncio.timeout(30):
                while b"30 90" not in await output(c, "term"):
                    await asyncio.sleep(0.1)
            await guestapi.control(c, "term", "resize", rows=50, cols=120)
            await guestapi.send_input(c, "term", b"go\n", eof=False)
            outs = await asyncio.wait_for(asyncio.gather(*watchers), 30)
            assert all(o == outs[0] for o in outs) and b"50 120" in outs[0]

    asyncio.run(main())


def test_a_stopped_session_can_be_removed_at_once(tmp_path: Path, sessions_root: Path) -> None:
    """Regression (seen in CI): `stop` answers once the end is recorded, a moment before the supervisor lets go of
    its lock; an `rm` right then was refused as "running"."""

    async def main() -> None:
        async with agent(tmp_path, sessions_root) as h:
            c = await h.client()
            for i in range(15):
                name = f"s{i}"
                await start(c, name, ["sleep", "100"])
                stopped = await guestapi.control(c, name, "stop", signal=int(signal.SIGTERM), timeout=5.0)
                assert stopped.state == "exited"
                await guestapi.remove(c, name, force=False)
            assert await guestapi.list_(c) == []

    asyncio.run(main())
