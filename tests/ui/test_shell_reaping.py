"""Terminal shells no page is attached to are ended after the UI's grace period; a page back in time keeps its shell.

Real `banger ui` (with `--shell-grace` short enough for a test), real websockets, a real QEMU guest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.conftest import BangerEnv
from tests.ui.conftest import UiServer, run_ui
from tests.vms.conftest import debian_image, debian_kernel, vm_home  # noqa: F401  (fixtures)

pytestmark = pytest.mark.vm
GRACE = 6.0


@pytest.fixture
def ui_shells(vm_home: BangerEnv, tmp_path: Path) -> Iterator[UiServer]:  # noqa: F811
    vm_home.cli("vm", "create", "--name", "reap", "--net", "none", "--vcpus", "1", check=True, timeout=600)
    try:
        with run_ui(vm_home, tmp_path / "xdg", "--shell-grace", str(GRACE)) as server:
            yield server
    finally:
        vm_home.cli("vm", "rm", "-f", "reap", timeout=300)


def _terminal(ui: UiServer, query: str = "") -> ClientConnection:
    with ui.client() as client:
        cookie = f"banger_ui={client.cookies['banger_ui']}"
    url = f"ws://127.0.0.1:{ui.port}/api/vms/reap/terminal?rows=24&cols=80{query}"
    return ws_connect(url, origin=f"http://127.0.0.1:{ui.port}", additional_headers={"Cookie": cookie})  # type: ignore[arg-type]


def _session_name(ws: ClientConnection) -> str:
    while True:
        msg = ws.recv(timeout=120)
        if isinstance(msg, str):
            return str(json.loads(msg)["session"])


def _shells(benv: BangerEnv) -> dict[str, str]:
    rows = json.loads(benv.cli("session", "ls", "reap", "--json", check=True).stdout)
    return {r["name"]: r["state"] for r in rows if r["name"].startswith("shell-")}


def _wait_gone(benv: BangerEnv, name: str, timeout: float) -> float:
    started = time.monotonic()
    while _shells(benv).get(name) == "running":
        assert time.monotonic() - started < timeout, f"{name} still running after {timeout:.0f}s"
        time.sleep(0.5)
    return time.monotonic() - started


def test_a_closed_page_s_shell_ends_after_the_grace_and_a_reload_keeps_it(ui_shells: UiServer) -> None:
    benv = ui_shells.benv
    with _terminal(ui_shells) as ws:
        name = _session_name(ws)
    assert _shells(benv).get(name) == "running"
    # Back within the grace period (a reload): the same shell, and it is not ended while attached.
    time.sleep(GRACE / 2)
    with _terminal(ui_shells, f"&session={name}") as ws:
        assert _session_name(ws) == name
        time.sleep(GRACE + 2)
        assert _shells(benv).get(name) == "running"
    # Gone for good: ended once the grace period passes, not before.
    left = time.monotonic()
    _wait_gone(benv, name, GRACE + 60)
    assert time.monotonic() - left >= GRACE - 1
