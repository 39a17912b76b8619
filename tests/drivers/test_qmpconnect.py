"""The QMP handshake retry (drivers/qmpconnect.py), against a STAND-IN monitor on a Unix socket: a real QEMU
cannot be made to fail its capabilities negotiation on demand. The stand-in speaks QMP's wire format (a greeting,
then JSON objects) and refuses the handshake of its first `failures` connections."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ConnectError

from banger.drivers import qmpconnect

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


async def _monitor(path: Path, failures: int, seen: list[str]) -> asyncio.AbstractServer:
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        mine = count

        def send(obj: dict[str, Any]) -> None:
            writer.write(json.dumps(obj).encode() + b"\r\n")

        send(GREETING)
        decoder, buf = json.JSONDecoder(), ""
        try:
            while chunk := await reader.read(4096):
                buf += chunk.decode()
                # Clients send JSON objects back to back, not lines (QEMU's parser is a streaming one).
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break  # the rest of this object is still on its way
                    buf = buf.lstrip()[end:]
                    seen.append(f"{mine}:{msg['execute']}")
                    if msg["execute"] == "qmp_capabilities" and mine <= failures:
                        send({"error": {"class": "GenericError", "desc": "stand-in refuses"}, "id": msg.get("id")})
                    else:
                        result = {"running": True} if msg["execute"] == "query-status" else {}
                        send({"return": result, "id": msg.get("id")})
                    await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_unix_server(serve, path=str(path))


def test_a_failed_handshake_is_retried_on_a_new_connection(tmp_path: Path) -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        server = await _monitor(tmp_path / "qmp.sock", failures=1, seen=seen)
        try:
            client = await qmpconnect.connect("test", str(tmp_path / "qmp.sock"))
            try:
                assert await client.execute("query-status") == {"running": True}
            finally:
                await client.disconnect()
        finally:
            server.close()
        return seen

    # The command ran once, on the second connection: nothing ran on the monitor before the handshake succeeded.
    assert asyncio.run(main()) == ["1:qmp_capabilities", "2:qmp_capabilities", "2:query-status"]


def test_a_monitor_that_keeps_refusing_fails_after_the_last_attempt(tmp_path: Path) -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        server = await _monitor(tmp_path / "qmp.sock", failures=99, seen=seen)
        try:
            with pytest.raises(ConnectError):
                await qmpconnect.connect("test", str(tmp_path / "qmp.sock"))
        finally:
            server.close()
        return seen

    assert len(asyncio.run(main())) == qmpconnect.CONNECT_ATTEMPTS
