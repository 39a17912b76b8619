"""Who may talk to the UI: a Host the UI answers to (against DNS rebinding), an Origin of its own for websockets
and writes, and a session cookie obtained by redeeming a one-time login token.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
from dataclasses import dataclass, field
from html import escape
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from banger.errors import InvalidInputError
from banger.ui.state import TokenChecker

COOKIE = "banger_ui"
WILDCARDS = {"0.0.0.0", "::", ""}


def own_names_and_addresses() -> set[str]:
    """This machine's host names and interface addresses (for a UI bound to every address)."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(Exception):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_addr():
                addr = msg.get_attr("IFA_ADDRESS")
                if addr:
                    names.add(str(addr))
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.add(str(info[4][0]))
    return {n.lower() for n in names if n}


def allowed_hosts(bound: str) -> set[str]:
    """Host names a request may carry: the bound address and localhost, or all of ours for a wildcard bind."""
    if bound in WILDCARDS:
        # The printed URL names the wildcard itself (http://0.0.0.0:PORT/), which reaches this machine too.
        return own_names_and_addresses() | {bound.lower()} - {""}
    return {bound.lower(), "localhost"}


def split_host(value: str) -> tuple[str, int | None]:
    """("host", port) from a Host header or an origin's netloc; IPv6 brackets removed."""
    parts = urlsplit(f"//{value}")
    try:
        port = parts.port
    except ValueError:
        return "", None
    return (parts.hostname or "").lower(), port


@dataclass
class Guard:
    """The UI's access policy and its logged-in sessions."""

    bound_host: str
    port: int
    tokens: TokenChecker
    hosts: set[str] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.hosts:
            self.hosts = allowed_hosts(self.bound_host)

    def host_ok(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        host, _port = split_host(host_header)
        return host in self.hosts

    def origin_ok(self, origin: str | None) -> bool:
        """An Origin of this UI itself: http, one of our host names, and our port."""
        if not origin:
            return False
        parts = urlsplit(origin)
        if parts.scheme != "http":
            return False
        host, port = split_host(parts.netloc)
        return host in self.hosts and (port or 80) == self.port

    def login(self, token: str) -> str:
        """Redeem a login token for a new session id (InvalidInputError when the token is no good)."""
        self.tokens.redeem(token)
        sid = secrets.token_urlsafe(32)
        self.sessions.add(sid)
        return sid


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class GuardMiddleware:
    """Applies the Guard to every HTTP request and websocket before the app sees it."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        is_ws = scope["type"] == "websocket"
        if not self.guard.host_ok(headers.get("host")):
            await _refuse(scope, receive, send, 403, "this UI does not answer to that Host", is_ws)
            return
        method = scope.get("method", "GET")
        # Websockets and writes must come from our own pages: SameSite does not separate ports of one host.
        needs_origin = is_ws or method not in ("GET", "HEAD")
        if needs_origin and "origin" in headers and not self.guard.origin_ok(headers["origin"]):
            await _refuse(scope, receive, send, 403, "cross-origin request refused", is_ws)
            return
        if is_ws and "origin" not in headers:
            await _refuse(scope, receive, send, 403, "a websocket needs an Origin", is_ws)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        html = "text/html" in headers.get("accept", "")  # a person at a browser, not a script
        if not is_ws and "token" in query:
            await self._login(scope, receive, send, query, html)
            return
        if _session_of(headers) not in self.guard.sessions:
            message = "not logged in: open the URL `banger ui url` prints"
            await _refuse(scope, receive, send, 401, message, is_ws, html=html)
            return
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send, query: dict[str, str], html: bool) -> None:
        try:
            sid = self.guard.login(query.pop("token"))
        except InvalidInputError as exc:
            await _refuse(scope, receive, send, 401, f"{exc.message} ({exc.hint})", False, html=html)
            return
        target = scope.get("path", "/") + (f"?{urlencode(query)}" if query else "")
        cookie = f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", target.encode()),
                    (b"set-cookie", cookie.encode()),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def _session_of(headers: dict[str, str]) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, message: str, is_ws: bool, *, html: bool = False
) -> None:
    if is_ws:
        # Refusing before accept: the server answers the handshake with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    if html:
        body = f"<!doctype html><title>banger</title><p>error: {escape(message)}</p>".encode()
        kind = b"text/html; charset=utf-8"
    else:
        body = json.dumps({"error": message}).encode()
        kind = b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
