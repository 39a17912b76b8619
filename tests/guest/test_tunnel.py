"""Tunnels through the real agent (a subprocess on the host, so its "guest loopback" is the host's): TCP both ways
with flow control, many at once, refused ports, reverse listeners and the port watch."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from banger import errors
from banger.guest import guesttunnel
from banger.guest.client import AgentClient
from banger.guest.protocol import Frame, Kind, Stream
from banger.guest.tunnelclient import Listener, listen, open_tunnel, watch_ports
from banger.tunnels.relay import relay, tcp_connector

from .conftest import running_agent

Body = Callable[[AgentClient], Awaitable[None]]


def with_client(tmp_path: Path, body: Body) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            await body(await agent.client())

    asyncio.run(main())


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the test closed a tunnel mid-stream
        finally:
            writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _roundtrip(c: AgentClient, port: int, payload: bytes) -> bytes:
    tunnel = await open_tunnel(c, port=port)
    got = bytearray()

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 100_000):
            await tunnel.write(bytes(view[i : i + 100_000]))
        await tunnel.write_eof()

    sender = asyncio.create_task(send())
    while data := await tunnel.read():
        got += data
    await sender
    await tunnel.close()
    return bytes(got)


def test_tunnel_carries_bytes_both_ways_and_many_at_once(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        server = await _echo_server()
        async with server:
            big = os.urandom(4 * 1024 * 1024)  # far beyond one window: credit must flow both ways
            assert hashlib.sha256(await _roundtrip(c, _port(server), big)).digest() == hashlib.sha256(big).digest()
            blobs = [os.urandom(300_000 + i) for i in range(12)]
            results = await asyncio.gather(*(_roundtrip(c, _port(server), b) for b in blobs))
            assert results == blobs
            # the session still serves other requests while tunnels are open
            tunnel = await open_tunnel(c, port=_port(server))
            assert (await c.run(["echo", "ok"])).stdout == b"ok\n"
            await tunnel.close()

    with_client(tmp_path, body)


def test_a_stalled_tunnel_does_not_block_the_others(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        server = await _echo_server()
        async with server:
            stalled = await open_tunnel(c, port=_port(server))
            # Nobody reads the stalled tunnel's echo: its window fills, and only it stops.
            # (Far more than the window plus what the kernel's socket buffers hold on either side.)
            writer = asyncio.create_task(stalled.write(bytes(64 * 1024 * 1024)))
            await asyncio.sleep(1.0)
            assert not writer.done()
            assert await asyncio.wait_for(_roundtrip(c, _port(server), b"x" * 100_000), 30) == b"x" * 100_000
            writer.cancel()
            await stalled.close()

    with_client(tmp_path, body)


def test_refused_port_is_a_clear_error(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        port = _free_port()
        with pytest.raises(errors.BangerError, match=f"nothing accepts connections on guest port {port}"):
            await open_tunnel(c, port=port)
        assert (await c.health()).pid > 0

    with_client(tmp_path, body)


async def _serve_reverse(c: AgentClient, listener: Listener, server: asyncio.Server) -> None:
    """The host side of a reverse tunnel: each connection the guest accepted, relayed to the echo server."""
    async for conn in listener.accepted():
        tunnel = await open_tunnel(c, accept=conn)
        host_reader, host_writer = await tcp_connector(_port(server))()
        asyncio.create_task(relay(tunnel, host_reader, host_writer))


def test_reverse_listener_relays_to_a_host_connector(tmp_path: Path) -> None:
    """Also a regression test: the relay used to cancel the agent's stream as soon as both directions had
    half-closed on the host, while the last bytes it sent could still wait in the agent's queue; the guest-side
    client then read nothing. Many short exchanges, each half-closed at once, make that window show."""

    async def body(c: AgentClient) -> None:
        server = await _echo_server()
        guest_port = _free_port()
        async with server:
            listener = await listen(c, guest_port)
            serving = asyncio.create_task(_serve_reverse(c, listener, server))
            for i in range(40):
                payload = os.urandom(1024 * (i % 5 + 1))
                reader, writer = await asyncio.open_connection("127.0.0.1", guest_port)
                writer.write(payload)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 30) == payload, f"exchange {i}"
                writer.close()
            with pytest.raises(errors.BangerError, match="cannot listen"):
                await listen(c, guest_port)  # taken by the first listener
            await listener.close()
            serving.cancel()

    with_client(tmp_path, body)


def test_port_watch_sees_listeners_come_and_go(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        seen = watch_ports(c, interval=0.1)
        first = await anext(seen)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port not in first
        async with asyncio.timeout(20):
            while port not in await anext(seen):
                pass
            sock.close()
            while port in await anext(seen):
                pass
        await seen.aclose()

    with_client(tmp_path, body)


def test_tcp_listeners_parses_proc(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n"
        "   1: 0100007F:1F91 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0        0 112 1\n"
    )
    assert guesttunnel.tcp_listeners(str(tmp_path)) == [8080]


def test_an_idle_guest_watch_polls_slowly_and_a_request_wakes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent's watch handler in this process, its events collected from a stand-in for the session's mux.
    monkeypatch.setattr(guesttunnel, "ACTIVE_WINDOW", 0.0)
    monkeypatch.setattr(guesttunnel, "IDLE_WATCH_INTERVAL", 30.0)
    monkeypatch.setattr(guesttunnel, "ACTIVITY", guesttunnel.Activity())
    sent: asyncio.Queue[list[int]] = asyncio.Queue()

    class Mux:
        async def send(self, kind: object, stream_id: int, **header: object) -> None:
            ports = header["ports"]
            assert isinstance(ports, list)
            sent.put_nowait(ports)

    class Session:
        mux = Mux()

    frame = Frame(Kind.WATCH, 1, {"interval": 0.1}, b"")

    async def main() -> None:
        watch = asyncio.create_task(guesttunnel.handle_watch(Session(), Stream(1), frame))  # type: ignore[arg-type]
        first = await asyncio.wait_for(sent.get(), 10)
        await asyncio.sleep(0.05)  # idle at once (window 0): the next poll is 30 s away
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            assert port not in first
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sent.get(), 1.5)  # an idle guest does not poll at the fast interval
            guesttunnel.ACTIVITY.started()  # a request: every watch goes to the fast interval (0.1 s here)
            assert port in await asyncio.wait_for(sent.get(), 5)
            guesttunnel.ACTIVITY.ended()
        watch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watch
        assert not guesttunnel.ACTIVITY.wakers

    asyncio.run(main())
