"""Bulk bytes over the RPC connection: uploads as `$/input` chunks with a window, downloads as `$/event` chunks.

The RPC wire is one JSON object per line (at most 16 MiB each), so bulk data travels in base64 chunks of CHUNK
bytes. Uploads are flow-controlled: the daemon acknowledges (`$/event` {ack: total}) what it has passed on, and
the CLI keeps at most WINDOW unacknowledged bytes in flight, so a slow guest never piles data up in the daemon.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from banger.errors import BangerError
from banger.progress import ProgressEvent
from banger.rpc import protocol
from banger.rpc.client import Client

CHUNK = 1024 * 1024
WINDOW = 8 * CHUNK

Renderer = Callable[[ProgressEvent], None]


def upload_call(
    client: Client, method: str, params: dict[str, Any], source: Path, *, step: str, render: Renderer
) -> Any:
    """Call `method` and stream `source` to it; returns the call's result. Ctrl-C cancels the call."""
    size = source.stat().st_size
    rid = client.send_request(method, {**params, "size": size})
    sent = acked = 0
    eof = False
    try:
        with source.open("rb") as f:
            while True:
                while not eof and sent - acked < WINDOW:
                    data = f.read(CHUNK)
                    fields: dict[str, Any] = {"data": base64.b64encode(data).decode()} if data else {"eof": True}
                    client.sock.sendall(protocol.request(protocol.INPUT, {"id": rid, **fields}, None))
                    sent += len(data)
                    eof = not data
                msg = client.pop_message()
                if msg is None:
                    client.fill()
                    continue
                params_ = msg.get("params") or {}
                if "method" in msg:
                    if params_.get("id") != rid:
                        continue
                    if "ack" in params_:
                        acked = int(params_["ack"])
                        render(ProgressEvent(step=step, done=acked, total=size))
                    elif msg["method"] == protocol.PROGRESS:
                        render(ProgressEvent.from_json(params_.get("event", {})))
                    continue
                if msg.get("id") == rid:
                    return client.result_of(msg)
    except KeyboardInterrupt:
        client.cancel(rid)
        raise


def download_call(
    client: Client, method: str, params: dict[str, Any], sink: IO[bytes], *, limit: int, step: str, render: Renderer
) -> Any:
    """Call `method`, writing its `{data}` events to `sink` (at most `limit` bytes); returns the call's result."""
    got = 0

    def on_notify(kind: str, params_: dict[str, Any]) -> None:
        nonlocal got
        if "data" in params_:
            chunk = base64.b64decode(params_["data"])
            got += len(chunk)
            if got > limit:
                raise BangerError(f"{method}: more than {limit} bytes came back; refusing the rest")
            sink.write(chunk)
            render(ProgressEvent(step=step, done=got))
        elif kind == protocol.PROGRESS:
            render(ProgressEvent.from_json(params_.get("event", {})))

    return client.call(method, params, on_notify=on_notify)
