"""Fixtures for the web UI: a real `banger ui` process on a loopback port, and helpers to reach it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import BangerEnv


@dataclass
class UiServer:
    """A running `banger ui`: its first login URL and base address."""

    proc: subprocess.Popen[str]
    login_url: str
    benv: BangerEnv

    @property
    def base(self) -> str:
        parts = urlsplit(self.login_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def port(self) -> int:
        port = urlsplit(self.login_url).port
        assert port is not None
        return port

    def fresh_url(self) -> str:
        """A new login URL from `banger ui url`."""
        return self.benv.cli("ui", "url", check=True).stdout.strip()

    @contextlib.contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """An HTTP client logged in with a fresh token (the cookie jar keeps the session)."""
        with httpx.Client(base_url=self.base, timeout=120) as client:
            resp = client.get(self.fresh_url().removeprefix(self.base))
            assert resp.status_code == 303 and "banger_ui" in client.cookies, resp.text
            yield client


@contextlib.contextmanager
def run_ui(benv: BangerEnv, runtime_dir: Path, *extra: str) -> Iterator[UiServer]:
    """Start `banger ui --port 0 --no-open` against benv's daemon; stopped (SIGINT, then kill) after."""
    runtime_dir.mkdir(exist_ok=True, mode=0o700)
    benv.env["XDG_RUNTIME_DIR"] = str(runtime_dir)  # the UI's state file lands in this test's tmp
    proc = benv.popen("ui", "--port", "0", "--no-open", *extra)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if not first.startswith("http://"):
            proc.kill()
            raise AssertionError(f"banger ui printed {first!r}; stderr: {proc.communicate(timeout=10)[1]}")
        yield UiServer(proc=proc, login_url=first, benv=benv)
    finally:
        proc.send_signal(2)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def ui(daemon: BangerEnv, tmp_path: Path) -> Iterator[UiServer]:
    """`banger ui` for a fresh daemon."""
    with run_ui(daemon, tmp_path / "xdg") as server:
        yield server
