"""JSON-RPC 2.0 over a Unix stream socket, one JSON object per line.

Beyond plain JSON-RPC, banger uses three notifications:
- `$/progress` (daemon -> client): `{"id": <request id>, "event": ProgressEvent}` while a call runs;
- `$/event` (daemon -> client): `{"id": <request id>, ...}` for streamed output of long calls;
- `$/cancel` (client -> daemon): `{"id": <request id>}` cancels that call (closing the connection cancels all);
- `$/input` (client -> daemon): `{"id": <request id>, ...}` feeds a running call (stdin data, resize, signal).
The first call on a connection is `rpc.hello`, which checks that CLI and daemon speak the same version.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # the CLI's fast path (`vm exec`) imports this module: no typing, no dataclasses
if TYPE_CHECKING:
    from typing import Any

# Lines can carry file chunks (base64) and long listings; keep them bounded all the same.
MAX_LINE = 16 * 1024 * 1024

PROGRESS = "$/progress"
EVENT = "$/event"
CANCEL = "$/cancel"
INPUT = "$/input"
HELLO = "rpc.hello"


class Request:
    """A call (with id) or a notification (id None)."""

    __slots__ = ("method", "params", "id")

    def __init__(self, method: str, params: dict[str, Any], id: int | str | None = None) -> None:
        self.method = method
        self.params = params
        self.id = id

    def __repr__(self) -> str:
        return f"Request(method={self.method!r}, params={self.params!r}, id={self.id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (self.method, self.params, self.id) == (other.method, other.params, other.id)

    __hash__ = None  # type: ignore[assignment]  # params is a dict: a request is not hashable


def encode(obj: dict[str, Any]) -> bytes:
    """One message as a line of compact JSON."""
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def request(method: str, params: dict[str, Any], id: int | str | None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    if id is not None:
        msg["id"] = id
    return encode(msg)


def result(id: int | str | None, value: Any) -> bytes:
    return encode({"jsonrpc": "2.0", "id": id, "result": value})


def error(id: int | str | None, code: int, message: str, data: dict[str, Any] | None = None) -> bytes:
    err: dict[str, Any] = {"code": int(code), "message": message}
    if data:
        err["data"] = data
    return encode({"jsonrpc": "2.0", "id": id, "error": err})


class ProtocolError(Exception):
    """A message that is not valid JSON-RPC; carries the JSON-RPC error code."""

    def __init__(self, code: int, message: str, id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.id = id


def parse_request(line: bytes) -> Request:
    """Parse one incoming line into a Request, or raise ProtocolError."""
    try:
        msg = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(-32700, f"parse error: {exc}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError(-32600, "invalid request: not a JSON object")
    rid = msg.get("id")
    if rid is not None and not isinstance(rid, int | str):
        raise ProtocolError(-32600, "invalid request: id must be a number or string")
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        raise ProtocolError(-32600, "invalid request: method must be a non-empty string", rid)
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(-32602, "invalid params: params must be an object (named parameters)", rid)
    return Request(method=method, params=params, id=rid)
