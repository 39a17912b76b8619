"""Run the real guest agent on the host, connected to the real AgentClient.

Inside a VM the agent talks over a virtio-serial port, a device that only exists in a guest. Here a Unix socket
stands in for it: the agent is started with `--connect PATH`, reads and writes the socket's raw fd exactly as it
does the port's, and reconnects after EOF the way it reopens the port after the host side goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import banger.guest
from banger.guest.client import AgentClient

GUEST_DIR = Path(banger.guest.__file__).resolve().parent
AGENT = GUEST_DIR / "agent.py"
# The system interpreter has no banger installed: running the agent with it proves the seed files are stdlib-only.
GUEST_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


@dataclass
class AgentHarness:
    """A running agent process and the socket it keeps connecting to."""

    proc: subprocess.Popen[bytes]
    connections: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    clients: list[AgentClient] = field(default_factory=list)

    async def accept(self, timeout: float = 30.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The agent's next connection."""
        return await asyncio.wait_for(self.connections.get(), timeout)

    async def client(self, timeout: float = 30.0) -> AgentClient:
        """A fresh protocol session on the agent's next connection."""
        reader, writer = await self.accept(timeout)
        client = await AgentClient.open(reader, writer, timeout=timeout)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def running_agent(tmp: Path, *extra: str) -> AsyncIterator[AgentHarness]:
    """Start agent.py as a subprocess that connects to a socket we listen on."""
    sock = tmp / "agent.sock"
    queue: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue.put_nowait((reader, writer))

    server = await asyncio.start_unix_server(on_conn, path=str(sock))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.Popen([GUEST_PYTHON, str(AGENT), "--connect", str(sock), *extra], env=env, cwd="/")
    harness = AgentHarness(proc, queue)
    try:
        yield harness
    finally:
        for client in harness.clients:
            await client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.close()
        await server.wait_closed()
