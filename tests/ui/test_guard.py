"""The UI's access rules on their own: which Host and Origin values pass, and one-time signed tokens."""

from __future__ import annotations

import socket
import time

import pytest

from banger.errors import InvalidInputError
from banger.ui.guard import Guard, split_host
from banger.ui.state import TokenChecker, UiState


def _guard(host: str, port: int = 7070) -> Guard:
    return Guard(bound_host=host, port=port, tokens=TokenChecker("s" * 64))


def test_host_header_must_name_the_bound_address_or_localhost() -> None:
    guard = _guard("127.0.0.1")
    for ok in ("127.0.0.1:7070", "127.0.0.1", "localhost:7070", "LOCALHOST"):
        assert guard.host_ok(ok), ok
    for bad in (None, "", "evil.example", "evil.example:7070", "127.0.0.1.evil.example", "[::1]:7070", "10.0.0.1"):
        assert not guard.host_ok(bad), bad


def test_a_wildcard_bind_accepts_the_machines_own_names_and_addresses() -> None:
    guard = _guard("0.0.0.0")
    assert guard.host_ok(f"{socket.gethostname()}:7070")
    assert guard.host_ok("127.0.0.1:7070") and guard.host_ok("[::1]:7070")
    assert guard.host_ok("0.0.0.0:7070")  # the URL `banger ui --host 0.0.0.0` prints
    assert not guard.host_ok("evil.example:7070")


def test_origin_must_be_this_ui_itself() -> None:
    guard = _guard("127.0.0.1", 7070)
    assert guard.origin_ok("http://127.0.0.1:7070") and guard.origin_ok("http://localhost:7070")
    for bad in (None, "null", "http://127.0.0.1:7071", "https://127.0.0.1:7070", "http://evil.example:7070"):
        assert not guard.origin_ok(bad), bad
    assert split_host("[::1]:80") == ("::1", 80) and split_host("a:notaport") == ("", None)


def test_tokens_are_signed_one_time_and_expire() -> None:
    state = UiState(pid=1, host="127.0.0.1", port=7070, secret="k" * 64)
    checker = TokenChecker(state.secret)
    token = state.mint()
    checker.redeem(token)
    with pytest.raises(InvalidInputError, match="already used"):
        checker.redeem(token)
    nonce, expiry, mac = state.mint().split(".")
    with pytest.raises(InvalidInputError, match="not valid"):
        checker.redeem(f"{nonce}.{int(expiry) + 3600}.{mac}")  # a longer life is a different signature
    with pytest.raises(InvalidInputError, match="not valid"):
        TokenChecker("other").redeem(state.mint())
    with pytest.raises(InvalidInputError, match="expired"):
        checker.redeem(state.mint(ttl=-1))
    assert state.url("t") == "http://127.0.0.1:7070/?token=t"
    assert int(state.mint().split(".")[1]) > time.time()
