"""The bounded, append-only session log with logical offsets (stdlib only: it ships on the seed drive).

Used by the guest's session supervisors and, in the same format and offsets, by the daemon's host copy.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_MAGIC = b"BGRLOG1 "
HEADER_LEN = 32


def _header(dropped: int) -> bytes:
    head = LOG_MAGIC + b"%020d" % dropped
    return head + b" " * (HEADER_LEN - len(head) - 1) + b"\n"


def read_header(fd: int) -> int:
    """The logical offset of the first byte kept in the log file on `fd` (bytes dropped before it)."""
    head = os.pread(fd, HEADER_LEN, 0)
    if len(head) != HEADER_LEN or not head.startswith(LOG_MAGIC):
        raise ValueError("not a session log")
    return int(head[len(LOG_MAGIC) : len(LOG_MAGIC) + 20])


class BoundedLog:
    """An append-only byte log of at most about `max_bytes`; the oldest bytes go first, and the header counts them.

    Offsets are logical: byte N of everything ever written keeps offset N. When the file grows past `max_bytes`
    its newest half is copied to a fresh file (header: the new number of dropped bytes) that replaces it by
    rename. A reader holding the old file still sees its complete contents, then reopens (LogReader).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max(max_bytes, 4096)
        if not path.exists():
            self._replace(0, b"")
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self.dropped = read_header(self.fd)
        self.size = os.fstat(self.fd).st_size - HEADER_LEN

    @property
    def end(self) -> int:
        """Logical offset one past the last byte written."""
        return self.dropped + self.size

    def append(self, data: bytes) -> None:
        """Add bytes at the end, dropping the oldest ones when the log is full."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)
        if self.size > self.max_bytes:
            keep = self.max_bytes // 2
            with open(self.path, "rb") as f:
                f.seek(HEADER_LEN + self.size - keep)
                tail = f.read(keep)
            self._reopen(self.end - len(tail), tail)

    def restart_at(self, offset: int) -> None:
        """Forget everything and continue at logical `offset` (the bytes before it were lost elsewhere)."""
        self._reopen(offset, b"")

    def _reopen(self, dropped: int, content: bytes) -> None:
        self._replace(dropped, content)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self.dropped, self.size = dropped, len(content)

    def _replace(self, dropped: int, content: bytes) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_header(dropped) + content)
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Close the file."""
        os.close(self.fd)


class LogReader:
    """Reads a BoundedLog by logical offset, following it across rotations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.dropped = 0

    def _open(self) -> bool:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self.dropped = read_header(self.fd)
        return True

    def read(self, offset: int, n: int) -> tuple[int, bytes]:
        """(offset of the first byte returned, bytes); b"" when nothing is there yet. Skips dropped bytes."""
        if self.fd is None and not self._open():
            return offset, b""
        for _ in range(2):
            assert self.fd is not None
            start = max(offset, self.dropped)
            data = os.pread(self.fd, n, HEADER_LEN + start - self.dropped)
            if data:
                return start, data
            # At the end of this file: if the log was rotated meanwhile, the new file continues it.
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    break
            except FileNotFoundError:
                break
            if not self._open():
                break
        return max(offset, self.dropped), b""

    def close(self) -> None:
        """Close the file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
