"""The running UI's state file (port and token secret, mode 0600), so `banger ui url` can mint login URLs."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from banger.errors import InvalidInputError, NotFoundError

TOKEN_TTL = 3600.0


def state_dir() -> Path:
    """The user's runtime dir (XDG_RUNTIME_DIR) when there is one, else ~/.cache/banger."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "banger"
    return Path.home() / ".cache" / "banger"


def _key(socket: Path) -> str:
    return hashlib.sha256(str(socket.absolute()).encode()).hexdigest()[:16]


def state_path(socket: Path, pid: int) -> Path:
    """One state file per UI process, named by its daemon's socket: UIs of separate state roots do not mix."""
    return state_dir() / f"ui-{_key(socket)}-{pid}.json"


def running_ui(socket: Path) -> UiState:
    """The newest UI still running for this daemon (files of UIs that died are removed), or NotFoundError."""
    found: list[tuple[float, UiState]] = []
    for path in state_dir().glob(f"ui-{_key(socket)}-*.json"):
        try:
            found.append((path.stat().st_mtime, UiState.read(path)))
        except NotFoundError:
            with contextlib.suppress(OSError):
                path.unlink()
        except OSError:
            continue
    if not found:
        raise NotFoundError("no banger ui is running", hint="start one with `banger ui`")
    return max(found, key=lambda item: item[0])[1]


@dataclass(frozen=True, slots=True)
class UiState:
    """Where a running UI listens and the secret its login tokens are signed with."""

    pid: int
    host: str
    port: int
    secret: str

    def url(self, token: str) -> str:
        """The login URL carrying `token`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={token}"

    def mint(self, ttl: float = TOKEN_TTL) -> str:
        """A fresh one-time login token: nonce, expiry and their HMAC under the secret."""
        body = f"{secrets.token_urlsafe(12)}.{int(time.time() + ttl)}"
        return f"{body}.{_mac(self.secret, body)}"

    def write(self, path: Path) -> None:
        """Write atomically, readable by the owner only."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": self.pid, "host": self.host, "port": self.port, "secret": self.secret}, f)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> UiState:
        """The state of the UI that is running, or NotFoundError."""
        try:
            raw = json.loads(path.read_text())
            state = cls(pid=int(raw["pid"]), host=str(raw["host"]), port=int(raw["port"]), secret=str(raw["secret"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NotFoundError("no banger ui is running", hint="start one with `banger ui`") from exc
        try:
            os.kill(state.pid, 0)
        except ProcessLookupError:
            raise NotFoundError("no banger ui is running (it exited)", hint="start one with `banger ui`") from None
        except PermissionError:
            pass
        return state

    def remove(self, path: Path) -> None:
        """Remove this UI's file."""
        with contextlib.suppress(OSError):
            path.unlink()


def _mac(secret: str, body: str) -> str:
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()[:32]


class TokenChecker:
    """Accepts each valid, unexpired token once."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._used: dict[str, float] = {}

    def redeem(self, token: str) -> None:
        """Check and consume `token`; InvalidInputError when it is forged, expired or used."""
        body, _, mac = token.rpartition(".")
        nonce, _, expiry = body.partition(".")
        if not nonce or not hmac.compare_digest(mac, _mac(self._secret, body)):
            raise InvalidInputError("this login link is not valid", hint="get a fresh one with `banger ui url`")
        now = time.time()
        if not expiry.isdigit() or int(expiry) < now:
            raise InvalidInputError("this login link has expired", hint="get a fresh one with `banger ui url`")
        if nonce in self._used:
            raise InvalidInputError("this login link was already used", hint="get a fresh one with `banger ui url`")
        self._used = {n: exp for n, exp in self._used.items() if exp >= now}
        self._used[nonce] = float(expiry)
