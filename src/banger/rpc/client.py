"""The CLI's synchronous RPC client: one call at a time, progress/events via callbacks, Ctrl-C cancels."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time

from banger import PROTOCOL_VERSION, __version__
from banger.buildinfo import code_id
from banger.errors import DaemonError, VersionMismatchError, error_class_for
from banger.rpc import protocol

TYPE_CHECKING = False  # typing and pathlib cost the CLI's fast path (`vm exec`) milliseconds; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    Notify = Callable[[str, dict[str, Any]], None]


class DaemonUnavailable(DaemonError):
    """No daemon answers on the socket."""


class Client:
    """A connection to bangerd. Use as a context manager."""

    def __init__(self, path: Path | str, *, connect_timeout: float = 5.0) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        self._connect_timeout = connect_timeout
        self.daemon_info: dict[str, Any] = {}

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, *, across_versions: bool = False) -> None:
        """Connect and perform the version handshake.

        With `across_versions`, a daemon of another protocol is still connected to (its handshake error is kept
        in `daemon_info`): the methods of the server's ACROSS_VERSIONS (status, stop) work on it.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonUnavailable(f"no daemon is listening on {self.path}") from exc
        except PermissionError as exc:
            sock.close()
            from banger.cli.access import denied_message
            from banger.errors import PermissionDeniedError

            message, hint = denied_message(os.path.dirname(os.path.dirname(str(self.path))))
            raise PermissionDeniedError(message, hint=hint) from exc
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"cannot connect to the daemon at {self.path}: {exc.strerror}") from exc
        sock.settimeout(None)
        self._sock = sock
        hello = {"version": __version__, "protocol": PROTOCOL_VERSION, "build": code_id()}
        try:
            self.daemon_info = self.call(protocol.HELLO, hello)
        except VersionMismatchError as exc:
            if not across_versions:
                raise
            self.daemon_info = {"same_code": False, "handshake_error": exc.message}

    @property
    def same_code(self) -> bool:
        """Whether the daemon runs this CLI's code (a daemon too old to say so does not)."""
        return bool(self.daemon_info.get("same_code", False))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(data)

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise DaemonError("not connected to the daemon")
        return self._sock

    def fill(self) -> None:
        """Read what the socket has (one recv); EOF is an error."""
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise DaemonError("the daemon closed the connection unexpectedly (see `banger daemon logs`)")
        if len(self._buf) > protocol.MAX_LINE and b"\n" not in self._buf:
            self.close()
            raise DaemonError(f"the daemon sent a message longer than {protocol.MAX_LINE} bytes; connection closed")
        self._buf += chunk

    def pop_message(self) -> dict[str, Any] | None:
        """The next complete message already buffered, or None."""
        if b"\n" not in self._buf:
            return None
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _read_message(self) -> dict[str, Any]:
        while (msg := self.pop_message()) is None:
            self.fill()
        return msg

    def send_request(self, method: str, params: dict[str, Any]) -> int:
        """Send a call without waiting; returns its id."""
        self._next_id += 1
        self._send(protocol.request(method, params, self._next_id))
        return self._next_id

    @staticmethod
    def result_of(msg: dict[str, Any]) -> Any:
        """The result of a reply message, or its error raised as the matching BangerError."""
        if "error" in msg:
            err = msg["error"]
            cls = error_class_for(int(err.get("code", 1)))
            data = err.get("data") or {}
            raise cls(str(err.get("message", "unknown error")), hint=data.get("hint"), data=data)
        return msg.get("result")

    def cancel(self, rid: int, grace: float = 15.0) -> None:
        """Ask the daemon to cancel call `rid` and wait (bounded) for its cleanup; closes the connection."""
        self._cancel(rid, grace)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_notify: Notify | None = None,
        cancel_grace: float = 15.0,
    ) -> Any:
        """Call `method`; notifications for it go to on_notify. Ctrl-C sends $/cancel and waits for the daemon."""
        rid = self.send_request(method, params or {})
        try:
            return self._await_reply(rid, on_notify)
        except KeyboardInterrupt:
            self._cancel(rid, cancel_grace)
            raise

    def _await_reply(self, rid: int, on_notify: Notify | None) -> Any:
        while True:
            msg = self._read_message()
            if "method" in msg:
                params = msg.get("params") or {}
                if params.get("id") == rid and on_notify is not None:
                    on_notify(msg["method"], params)
                continue
            if msg.get("id") != rid:
                continue
            return self.result_of(msg)

    def _cancel(self, rid: int, grace: float) -> None:
        """Ask the daemon to cancel `rid` and wait (bounded) until it confirms its cleanup ran."""
        try:
            self._send(protocol.request(protocol.CANCEL, {"id": rid}, None))
            assert self._sock is not None
            deadline = time.monotonic() + grace
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self._sock], [], [], left)
                if not ready:
                    break
                msg = self._read_message()
                if msg.get("id") == rid and "method" not in msg:
                    break
        except (OSError, DaemonError, KeyboardInterrupt):
            pass
        finally:
            self.close()
