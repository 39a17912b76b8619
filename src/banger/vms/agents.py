"""One agent connection per running VM, shared by every operation on it and re-opened when it drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger.errors import TimeoutError_
from banger.guest.client import AgentClient

log = logging.getLogger("banger.vms")

# How long to wait between connection attempts while a guest boots; the socket exists from launch, but the
# agent only answers once the guest has started it.
_RETRY_S = 0.2


@dataclass(frozen=True)
class AgentEndpoint:
    """Where a VM's agent is reached: a Unix socket, plus the vsock port for Firecracker's hybrid vsock."""

    socket: Path
    vsock_port: int | None = None

    @classmethod
    def from_runtime(cls, runtime: dict[str, Any]) -> AgentEndpoint:
        return cls(Path(runtime["agent_socket"]), runtime.get("agent_vsock_port"))

    async def connect(self, timeout: float) -> AgentClient:
        if self.vsock_port is not None:
            return await AgentClient.connect_firecracker_vsock(self.socket, self.vsock_port, timeout=timeout)
        return await AgentClient.connect_unix(self.socket, timeout=timeout)


class AgentPool:
    """Connected AgentClients keyed by VM id."""

    def __init__(self) -> None:
        self._clients: dict[str, AgentClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, vm_id: str, endpoint: AgentEndpoint, timeout: float) -> AgentClient:
        """A connected, healthy client for `vm_id`, connecting (and waiting for the agent) if needed."""
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            client = self._clients.get(vm_id)
            if client is not None and client.connected:
                return client
            if client is not None:
                await self.drop(vm_id)
            client = await wait_for_agent(endpoint, timeout)
            self._clients[vm_id] = client
            return client

    async def drop(self, vm_id: str) -> None:
        """Close and forget the connection of `vm_id`."""
        client = self._clients.pop(vm_id, None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def close_all(self) -> None:
        for vm_id in list(self._clients):
            await self.drop(vm_id)


async def wait_for_agent(endpoint: AgentEndpoint, timeout: float) -> AgentClient:
    """Connect to the agent channel and wait for a health answer, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while (left := deadline - time.monotonic()) > 0:
        try:
            client = await endpoint.connect(timeout=min(left, 30.0))
        except (TimeoutError, OSError, TimeoutError_) as exc:
            last = exc
            await asyncio.sleep(_RETRY_S)
            continue
        except Exception as exc:  # a protocol error while the guest is still coming up
            last = exc
            await asyncio.sleep(_RETRY_S)
            continue
        try:
            await client.health(timeout=max(1.0, deadline - time.monotonic()))
            return client
        except Exception as exc:
            last = exc
            await client.close()
            await asyncio.sleep(_RETRY_S)
    raise TimeoutError_(f"the guest agent did not answer within {timeout:.0f}s ({last})")
