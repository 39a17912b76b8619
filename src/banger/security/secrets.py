"""Secrets (an agent's provider key, say) kept on the host side: in root-only files under the state root, never
in the SQLite store, never in a process's argv, and scrubbed from every log line the daemon writes.

A service that needs one holds a `Secret` (whose str/repr hide the value) and reveals it only where it is
handed over: into a child's environment or stdin, or over the agent channel; the guest gets it at run time,
so it never lands in an image or a snapshot of the disk.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from banger.errors import InvalidInputError, NotFoundError

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MASK = "***"


class Secret:
    """A secret value that does not print itself."""

    __slots__ = ("_value", "name")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self._value = value

    def reveal(self) -> str:
        """The value, for the one place that hands it over."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.name}={MASK})"

    def __str__(self) -> str:
        return MASK


class RedactingFilter(logging.Filter):
    """Replaces every known secret value in a log record's final message with ***."""

    def __init__(self) -> None:
        super().__init__()
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        """Start hiding `value` (values shorter than 4 characters would mask ordinary text: refused)."""
        if len(value) >= 4:
            with self._lock:
                self._values.add(value)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._values:
            return True
        message = record.getMessage()
        with self._lock:
            values = sorted(self._values, key=len, reverse=True)
        redacted = message
        for value in values:
            redacted = redacted.replace(value, MASK)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


REDACT = RedactingFilter()


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Put the redacting filter on every handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if REDACT not in handler.filters:
            handler.addFilter(REDACT)


class SecretVault:
    """Named secrets in `root` (0700), one 0600 file each, written atomically; values are redacted from logs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise InvalidInputError(f"bad secret name {name!r}: letters, digits, '.', '_' and '-' only")
        return self.root / name

    def put(self, name: str, value: str) -> Secret:
        """Store (or replace) a secret."""
        path = self._path(name)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        tmp = path.with_name(f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, value.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        REDACT.add(value)
        return Secret(name, value)

    def get(self, name: str) -> Secret:
        """A stored secret."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFoundError(f"no secret named {name!r}") from None
        with os.fdopen(fd, "rb") as f:
            value = f.read().decode()
        REDACT.add(value)
        return Secret(name, value)

    def remove(self, name: str) -> None:
        """Forget a secret (no error when it is not there)."""
        self._path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        """Stored secret names."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.match(p.name) and not p.name.startswith("."))
