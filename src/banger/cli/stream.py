"""Interactive calls (vm exec, shell, logs -f): stdin and terminal events up, output events down."""

from __future__ import annotations

import binascii
import contextlib
import fcntl
import os
import select
import signal
import struct
import sys
import termios

from banger.rpc import protocol
from banger.rpc.client import Client

TYPE_CHECKING = False  # `vm exec`'s fast path imports this module: typing stays out at run time
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on fd, or 24x80."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return rows or 24, cols or 80
    except OSError:
        return 24, 80


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put the terminal in raw mode (keys go to the guest, Ctrl-C included) and restore it after."""
    import tty as ttymod

    old = termios.tcgetattr(fd)
    try:
        ttymod.setraw(fd, termios.TCSADRAIN)  # TCSAFLUSH would drop what the user typed ahead
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


# Stdin bytes in flight to a call that acknowledges them (`{"ack": N}` events): well under the daemon's bound on
# unread input (64 MiB on the wire, where base64 adds a third), so piping a large file into a slow guest waits
# for the guest instead of failing.
INPUT_WINDOW = 8 * 1024 * 1024


def stream_call(
    client: Client,
    method: str,
    params: dict[str, Any],
    *,
    stdin: bool,
    tty: bool,
    detach: bytes | None = None,
    acked: bool = False,
) -> dict[str, Any]:
    """Run one streaming call to completion; returns its result.

    Non-tty: Ctrl-C is forwarded to the guest process as SIGINT (a second one cancels the call).
    tty: the terminal is raw, so Ctrl-C travels as a byte; window size changes are forwarded.
    detach: a byte that, typed on stdin, ends the call (the daemon cancels it) and returns {"detached": True}.
    acked: the call acknowledges stdin (`{"ack": N}`); at most INPUT_WINDOW bytes are then sent ahead of the acks.
    """
    rid = client.send_request(method, params)
    sock = client.sock
    sock_fd = sock.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    pending: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        pending.append(signum)

    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_int = signal.signal(signal.SIGINT, on_signal)
    old_winch = signal.signal(signal.SIGWINCH, on_signal) if tty else None
    in_fd = sys.stdin.fileno() if stdin else None
    out = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
    interrupts = 0
    unacked = 0

    def send_input(**fields: Any) -> None:
        sock.sendall(protocol.request(protocol.INPUT, {"id": rid, **fields}, None))

    raw = raw_terminal(sys.stdin.fileno()) if tty and sys.stdin.isatty() else contextlib.nullcontext()
    try:
        with raw:
            while True:
                msg = client.pop_message()
                if msg is None:
                    reading = in_fd is not None and (not acked or unacked < INPUT_WINDOW)
                    fds = [sock_fd, wake_r] + ([in_fd] if reading and in_fd is not None else [])
                    ready, _, _ = select.select(fds, [], [])
                    if wake_r in ready:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                    for signum in pending:
                        if signum == signal.SIGWINCH:
                            send_input(resize=list(terminal_size(sys.stdin.fileno())))
                        elif signum == signal.SIGINT:
                            interrupts += 1
                            if interrupts > 1:
                                raise KeyboardInterrupt
                            send_input(signal=int(signal.SIGINT))
                    pending.clear()
                    if in_fd is not None and in_fd in ready:
                        data = os.read(in_fd, 65536)
                        if detach is not None and detach in data:
                            before = data.split(detach, 1)[0]
                            if before:
                                send_input(data=binascii.b2a_base64(before, newline=False).decode())
                            client.cancel(rid, grace=5.0)
                            return {"detached": True}
                        if data:
                            send_input(data=binascii.b2a_base64(data, newline=False).decode())
                            unacked += len(data)
                        else:
                            send_input(eof=True)
                            in_fd = None
                    if sock_fd in ready:
                        client.fill()
                    continue
                if "method" in msg:
                    params_ = msg.get("params") or {}
                    if params_.get("id") != rid:
                        continue
                    if "fd" in params_:
                        stream = out[2 if params_["fd"] == 2 else 1]
                        stream.write(binascii.a2b_base64(params_["data"]))
                        stream.flush()
                    elif "text" in params_:
                        sys.stdout.write(params_["text"])
                        sys.stdout.flush()
                    elif "ack" in params_:
                        unacked -= int(params_["ack"])
                    continue
                if msg.get("id") == rid:
                    result: dict[str, Any] = client.result_of(msg)
                    return result
    except KeyboardInterrupt:
        client.cancel(rid)
        raise
    finally:
        signal.signal(signal.SIGINT, old_int)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
