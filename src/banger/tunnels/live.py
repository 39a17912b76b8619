"""What one running VM has open on the host side: published listeners, automatic forwards, reverse tunnels.

Each background loop re-opens its agent stream after the connection drops (the agent restarted, say) until the
VM stops; nothing here blocks the VM's lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from banger.errors import BangerError, InUseError
from banger.guest.client import AgentClient
from banger.guest.tunnelclient import Tunnel, listen, open_tunnel, watch_ports
from banger.tunnels.publish import LOOPBACK, PortListener, Publish
from banger.tunnels.relay import HostConnector, relay, tcp_connector

log = logging.getLogger("banger.tunnels")

RETRY_S = 1.0
AUTO_PORT_TRIES = 50
# Guest ports never forwarded automatically: SSH has `vm ssh`, and the rest are banger's own.
ALWAYS_SKIPPED = frozenset({22})

ClientGetter = Callable[[], Awaitable[AgentClient]]


class LiveVm:
    """The host side of one running VM's tunnels."""

    def __init__(self, vm_id: str, name: str, client: ClientGetter) -> None:
        self.vm_id, self.name = vm_id, name
        self._client = client
        self.published: dict[int, PortListener] = {}
        self.auto: dict[int, PortListener] = {}  # guest port -> listener on 127.0.0.1
        self.reverse: dict[int, asyncio.Task[None]] = {}  # guest port -> listening loop
        self.skip: set[int] = set(ALWAYS_SKIPPED)
        self._tasks: set[asyncio.Task[None]] = set()
        self._auto_task: asyncio.Task[None] | None = None

    async def open(self, guest_port: int) -> Tunnel:
        """A tunnel to guest 127.0.0.1:guest_port."""
        return await open_tunnel(await self._client(), port=guest_port)

    # -- published ports -----------------------------------------------------------------------------------

    async def publish(self, pub: Publish) -> None:
        """Listen for a published port (InUseError if the host port is taken)."""
        if pub.host_port in self.published:
            await self.unpublish(pub.host_port)
        listener = PortListener(pub.address, pub.host_port, pub.guest_port, self.open)
        await listener.start()
        self.published[pub.host_port] = listener

    async def unpublish(self, host_port: int) -> None:
        listener = self.published.pop(host_port, None)
        if listener is not None:
            await listener.stop()

    # -- automatic forwards --------------------------------------------------------------------------------

    def start_auto(self, taken: Callable[[], set[int]]) -> None:
        """Follow the guest's listening ports; `taken` gives host ports that must not be used (published ones)."""
        self._auto_task = self._spawn(self._auto_loop(taken))

    async def _auto_loop(self, taken: Callable[[], set[int]]) -> None:
        while True:
            try:
                async for ports in watch_ports(await self._client()):
                    await self._sync_auto(set(ports), taken())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("vm %s: port watch ended: %s", self.name, exc)
            await asyncio.sleep(RETRY_S)

    async def _sync_auto(self, listening: set[int], taken: set[int]) -> None:
        wanted = listening - self.skip - set(self.reverse) - {p.guest_port for p in self.published.values()}
        for guest_port in sorted(set(self.auto) - wanted):
            await self.auto.pop(guest_port).stop()
            log.info("vm %s: guest port %d closed; forward stopped", self.name, guest_port)
        for guest_port in sorted(wanted - set(self.auto)):
            listener = await self._auto_listen(guest_port, taken | {a.host_port for a in self.auto.values()})
            if listener is not None:
                self.auto[guest_port] = listener
                log.info("vm %s: guest port %d forwarded to 127.0.0.1:%d", self.name, guest_port, listener.host_port)

    async def _auto_listen(self, guest_port: int, taken: set[int]) -> PortListener | None:
        host_port = guest_port
        for _ in range(AUTO_PORT_TRIES):
            if host_port not in taken and host_port not in self.published:
                listener = PortListener(LOOPBACK, host_port, guest_port, self.open)
                try:
                    await listener.start()
                    return listener
                except BangerError:
                    pass
            host_port = host_port + 1 if host_port < 65535 else 1024
        log.warning("vm %s: no free host port near %d for guest port %d", self.name, guest_port, guest_port)
        return None

    def auto_ports(self) -> dict[int, int]:
        """guest port -> host port of the automatic forwards now active."""
        return {g: lst.host_port for g, lst in self.auto.items()}

    # -- reverse tunnels -----------------------------------------------------------------------------------

    def start_reverse(self, guest_port: int, connector: HostConnector) -> asyncio.Future[None]:
        """Start a reverse tunnel's loop; the future resolves once the guest listens (or fails if it cannot)."""
        if guest_port in self.reverse:
            raise InUseError(f"guest port {guest_port} already has a reverse tunnel")
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.reverse[guest_port] = self._spawn(self._reverse_loop(guest_port, connector, ready))
        return ready

    async def add_reverse(self, guest_port: int, connector: HostConnector, ready_timeout: float = 60.0) -> None:
        """Guest 127.0.0.1:guest_port reaches whatever `connector` opens; returns once the guest listens."""
        ready = self.start_reverse(guest_port, connector)
        try:
            async with asyncio.timeout(ready_timeout):
                await asyncio.shield(ready)
        except BaseException:
            await self.remove_reverse(guest_port)
            raise

    async def remove_reverse(self, guest_port: int) -> None:
        task = self.reverse.pop(guest_port, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _reverse_loop(self, guest_port: int, connector: HostConnector, ready: asyncio.Future[None]) -> None:
        while True:
            try:
                client = await self._client()
                listener = await listen(client, guest_port)
                if not ready.done():
                    ready.set_result(None)
                try:
                    async for conn in listener.accepted():
                        self._spawn(self._reverse_conn(client, conn, connector))
                finally:
                    await listener.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(exc)
                    return
                log.info("vm %s: reverse tunnel on guest port %d: %s", self.name, guest_port, exc)
            await asyncio.sleep(RETRY_S)

    async def _reverse_conn(self, client: AgentClient, conn: int, connector: HostConnector) -> None:
        tunnel = await open_tunnel(client, accept=conn)
        try:
            reader, writer = await connector()
        except Exception as exc:
            log.info("vm %s: reverse tunnel: host side refused: %s", self.name, exc)
            await tunnel.close()
            return
        await relay(tunnel, reader, writer)

    def start_tcp_reverse(self, guest_port: int, host_port: int) -> asyncio.Future[None]:
        """`--reverse GUEST:HOST`."""
        return self.start_reverse(guest_port, tcp_connector(host_port))

    # -- lifecycle -----------------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def close(self) -> None:
        """Stop every listener and loop of this VM."""
        listeners: Iterable[PortListener] = [*self.published.values(), *self.auto.values()]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for listener in listeners:
            with contextlib.suppress(Exception):
                await listener.stop()
        self.published.clear()
        self.auto.clear()
        self.reverse.clear()
