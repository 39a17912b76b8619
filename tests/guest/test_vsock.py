"""AgentClient.connect_firecracker_vsock against a stand-in for Firecracker's hybrid vsock socket.

Firecracker cannot boot a guest on this machine (its KVM is paravirtual nested KVM, which Firecracker guests hang
under), so a small Unix server plays Firecracker's part: it reads `CONNECT <port>`, hangs up while "nothing
listens in the guest" the way Firecracker does, then answers `OK <host port>` and splices the stream to the real
agent (which stands in for the guest side as in conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from banger import errors
from banger.guest.client import AgentClient

from .conftest import AgentHarness, running_agent

PORT = 1024


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class FakeFirecrackerVsock:
    """Firecracker's host-side vsock protocol, forwarding accepted connections to the agent."""

    def __init__(self, agent: AgentHarness, refuse_first: int) -> None:
        self.agent = agent
        self.refusals_left = refuse_first
        self.requests: list[bytes] = []

    async def on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self.requests.append(line)
        if line != f"CONNECT {PORT}\n".encode() or self.refusals_left > 0:
            self.refusals_left -= 1
            writer.close()  # what Firecracker does when no guest socket listens on that port
            return
        guest_reader, guest_writer = await self.agent.accept()
        writer.write(b"OK 1073741824\n")
        await writer.drain()
        await asyncio.gather(_copy(reader, guest_writer), _copy(guest_reader, writer))


def test_connect_firecracker_vsock_retries_until_the_guest_listens(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            fake = FakeFirecrackerVsock(agent, refuse_first=2)
            uds = tmp_path / "v.sock"
            server = await asyncio.start_unix_server(fake.on_conn, path=str(uds))
            async with server:
                client = await AgentClient.connect_firecracker_vsock(uds, PORT, timeout=20)
                try:
                    assert (await client.health()).version == 1
                    assert (await client.run(["echo", "via vsock"])).stdout == b"via vsock\n"
                finally:
                    await client.close()
            assert fake.requests == [b"CONNECT 1024\n"] * 3

    asyncio.run(main())


def test_connect_firecracker_vsock_times_out_cleanly(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            fake = FakeFirecrackerVsock(agent, refuse_first=1_000_000)
            uds = tmp_path / "v.sock"
            server = await asyncio.start_unix_server(fake.on_conn, path=str(uds))
            async with server:
                with pytest.raises(errors.TimeoutError_, match="did not accept a vsock connection"):
                    await AgentClient.connect_firecracker_vsock(uds, PORT, timeout=1.0)
            assert len(fake.requests) >= 2

    asyncio.run(main())
