"""The host cuts off an agent that ignores flow-control credit instead of buffering what it sends.

The hostile agent is the real agent.py (from a copy of the seed files) with one method patched: Credit.take no
longer waits, exactly what root in a guest could do to its own agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from banger import errors
from banger.guest import protocol
from banger.guest.client import AgentClient
from banger.guest.seed import GUEST_FILES

from .conftest import GUEST_DIR, GUEST_PYTHON

SEED_FILES = GUEST_FILES  # everything agent.py imports, as on the seed drive
# Prepended to a copy of agent.py: credit is spent but never waited for.
HOSTILE_PATCH = """
import protocol as _protocol

async def _take_without_waiting(self, n):
    self._available -= n
    return not self._closed

_protocol.Credit.take = _take_without_waiting
"""
FLOOD_BYTES = 8 * 1024 * 1024


def seed_copy(tmp: Path, hostile: bool) -> Path:
    """The guest's seed files as plain siblings (as on the seed drive); agent.py patched if `hostile`."""
    seed = tmp / ("hostile" if hostile else "honest")
    seed.mkdir()
    for name in SEED_FILES:
        shutil.copy(GUEST_DIR / name, seed / name)
    if hostile:
        text = (seed / "agent.py").read_text()
        marker = 'if __name__ == "__main__":'
        (seed / "agent.py").write_text(text.replace(marker, HOSTILE_PATCH + "\n\n" + marker))
    return seed


@contextlib.asynccontextmanager
async def agent_session(tmp: Path, hostile: bool) -> AsyncIterator[AgentClient]:
    """A session with agent.py run from a seed copy, over a Unix socket standing in for the serial port."""
    seed = seed_copy(tmp, hostile)
    sock = tmp / "agent.sock"
    conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.put_nowait((reader, writer))

    server = await asyncio.start_unix_server(on_conn, path=str(sock))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.Popen([GUEST_PYTHON, "-B", str(seed / "agent.py"), "--connect", str(sock)], env=env, cwd="/")
    client = None
    try:
        reader, writer = await asyncio.wait_for(conns.get(), 30)
        client = await AgentClient.open(reader, writer, timeout=30)
        yield client
    finally:
        if client is not None:
            await client.close()
        proc.kill()
        proc.wait(timeout=10)
        server.close()
        await server.wait_closed()


async def stalled_exec(client: AgentClient, release: asyncio.Event, got: bytearray) -> asyncio.Task[object]:
    """Start a command that writes FLOOD_BYTES, with a sink that takes the first chunk, then stalls until released."""

    async def sink(data: bytes) -> None:
        got.extend(data)
        await release.wait()

    argv = ["head", "-c", str(FLOOD_BYTES), "/dev/zero"]
    handle = await client.start_exec(argv, stdout=sink)
    return asyncio.ensure_future(handle.wait())


def test_agent_ignoring_credit_is_cut_off_not_buffered(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_session(tmp_path, hostile=True) as client:
            release, got = asyncio.Event(), bytearray()
            waiter = await stalled_exec(client, release, got)
            for _ in range(300):
                if not client.connected:
                    break
                await asyncio.sleep(0.1)
            assert not client.connected, "the host kept buffering a guest that ignores flow control"
            release.set()
            with pytest.raises(errors.BangerError, match="ignored flow control"):
                await asyncio.wait_for(waiter, 30)
            # It never held more than the window: what was queued before the overrun, the rest refused.
            assert len(got) <= protocol.WINDOW + protocol.MAX_CHUNK < FLOOD_BYTES

    asyncio.run(main())


def test_honest_agent_waits_for_a_stalled_reader(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_session(tmp_path, hostile=False) as client:
            release, got = asyncio.Event(), bytearray()
            waiter = await stalled_exec(client, release, got)
            await asyncio.sleep(2)  # the agent fills the window and waits; nothing is cut off
            assert client.connected and not waiter.done()
            stream = next(iter(client.mux.streams.values()))
            assert stream.unacked <= protocol.WINDOW
            release.set()
            status = await asyncio.wait_for(waiter, 60)
            assert status.ok  # type: ignore[attr-defined]
            assert len(got) == FLOOD_BYTES

    asyncio.run(main())


def make_mux() -> tuple[protocol.Mux, protocol.Stream]:
    async def write(data: bytes) -> None:
        pass

    mux = protocol.Mux(asyncio.StreamReader(), write, enforce_window=True)
    stream = protocol.Stream(1)
    mux.streams[1] = stream
    return mux, stream


def data(fd: int, payload: bytes) -> protocol.Frame:
    return protocol.Frame(str(protocol.Kind.DATA), 1, {"t": "data", "id": 1, "fd": fd}, payload)


def test_small_writes_merge_into_one_queued_frame() -> None:
    async def main() -> None:
        mux, stream = make_mux()
        for _ in range(5000):
            mux.route(data(1, b"x"))
        assert stream.inbox.qsize() == 1
        frame = await stream.inbox.get()
        assert frame.payload == b"x" * 5000
        mux.ack(1, 5000)
        assert stream.unacked == 0

    asyncio.run(main())


def test_too_many_queued_frames_is_a_violation() -> None:
    async def main() -> None:
        mux, stream = make_mux()
        with pytest.raises(protocol.WindowExceeded, match="frames queued"):
            # Alternating fds cannot merge: each byte would cost a whole frame.
            for i in range(protocol.MAX_QUEUED_FRAMES + 1):
                mux.route(data(1 + i % 2, b"x"))
        assert stream.inbox.qsize() <= protocol.MAX_QUEUED_FRAMES

    asyncio.run(main())


def test_bytes_beyond_the_window_are_a_violation() -> None:
    async def main() -> None:
        mux, stream = make_mux()
        chunk = bytes(protocol.MAX_CHUNK)
        for _ in range(protocol.WINDOW // protocol.MAX_CHUNK):
            mux.route(data(1, chunk))
        with pytest.raises(protocol.WindowExceeded, match="beyond"):
            mux.route(data(1, b"x"))

    asyncio.run(main())
