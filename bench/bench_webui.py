"""Web UI: terminal keystroke-to-echo latency through the UI against `banger vm shell` in a terminal, and the VMs
page's load time with 20 VMs.

Keystrokes: one running VM (--net none). The UI side is the browser's path minus the browser: a websocket to
`/api/vms/NAME/terminal` (logged in, with the page's Origin), one key per frame, timed until the key's echo comes
back. The baseline is `banger vm shell NAME` on a real pseudo-terminal, one key written to the master, timed until
its echo is read back. Both sides are interleaved, so other load on the host hits both alike.
Page load: 20 `--no-start` VMs; Debian's chromium (Playwright) loads the logged-in VMs page, timed from navigation
until the table shows all 20 rows, next to `banger vm ls` (the same listing through the CLI) and `GET /api/vms`.
Run (as root): .venv/bin/python bench/bench_webui.py [--keys 100] [--loads 10] [--vms 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_vm import BANGER, IMAGE, KERNEL, PRESET, Home, banger_home, cleanup_on_signals, log, pct, timed

KEY_TIMEOUT = 30.0
PROMPT_TIMEOUT = 120.0


@contextlib.contextmanager
def ui_server(home: Home, runtime: Path) -> Iterator[str]:
    """`banger ui --port 0 --no-open`; yields its first login URL."""
    env = dict(home.env, XDG_RUNTIME_DIR=str(runtime))
    argv = [BANGER, "ui", "--port", "0", "--no-open"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.send_signal(2)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def login(url: str) -> tuple[str, str]:
    """(base URL, session cookie) for a login URL."""
    base = url.split("/?", 1)[0]
    resp = httpx.get(url, follow_redirects=False, timeout=30)
    return base, resp.cookies["banger_ui"]


def _wait_for(read: Callable[[float], bytes], needle: bytes, timeout: float) -> None:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"timed out waiting for {needle!r}; got {seen[-200:]!r}")
        seen += read(left)


def _keystrokes(send: Callable[[bytes], None], read: Callable[[float], bytes], n: int) -> list[float]:
    """Type a letter and then erase it, `n` times; each key's time until its echo is back."""
    times = []
    for i in range(n):
        key = b"abcdefghij"[i % 10 : i % 10 + 1]
        for data, echo in ((key, key), (b"\x7f", b"\x08")):
            start = time.perf_counter()
            send(data)
            _wait_for(read, echo, KEY_TIMEOUT)
            times.append(time.perf_counter() - start)
    return times


def terminal_socket(base: str, cookie: str, vm: str) -> ClientConnection:
    """The UI's terminal websocket, opened as the page opens it."""
    url = base.replace("http://", "ws://") + f"/api/vms/{vm}/terminal?rows=24&cols=80"
    return ws_connect(url, origin=base, additional_headers={"Cookie": f"banger_ui={cookie}"})  # type: ignore[arg-type]


class WebTerminal:
    """Keys over the UI's terminal websocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    def send(self, data: bytes) -> None:
        self.ws.send(json.dumps({"data": data.decode()}))

    def read(self, timeout: float) -> bytes:
        msg = self.ws.recv(timeout=timeout)
        return msg if isinstance(msg, bytes) else b""


class PtyShell:
    """`banger vm shell` on a real pseudo-terminal, as a user's terminal runs it."""

    def __init__(self, env: dict[str, str], vm: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [BANGER, "vm", "shell", vm], env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        return os.read(self.master, 65536) if ready else b""

    def close(self) -> None:
        os.write(self.master, b"exit\r")
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.master)


def bench_keys(home: Home, base: str, cookie: str, rounds: int, keys: int) -> None:
    with terminal_socket(base, cookie, "vm0") as ws:
        _bench_keys(home, WebTerminal(ws), rounds, keys)


def _bench_keys(home: Home, web: WebTerminal, rounds: int, keys: int) -> None:
    shell = PtyShell(home.env, "vm0")
    try:
        for side in (web, shell):  # a prompt first; then warm both paths
            _wait_for(side.read, b"# ", PROMPT_TIMEOUT)
            _keystrokes(side.send, side.read, 5)
        results: dict[str, list[float]] = {"vm shell (terminal)": [], "web UI terminal": []}
        for _ in range(rounds):
            results["web UI terminal"] += _keystrokes(web.send, web.read, keys // rounds)
            results["vm shell (terminal)"] += _keystrokes(shell.send, shell.read, keys // rounds)
    finally:
        shell.close()
    floor = statistics.median(results["vm shell (terminal)"])
    print(f"\nkeystroke -> echo ({len(results['web UI terminal'])} keys per side, interleaved in {rounds} rounds)")
    print(f"{'path':<24} {'p50 ms':>8} {'p95 ms':>8} {'x shell':>8}")
    for name, xs in results.items():
        p50 = statistics.median(xs)
        print(f"{name:<24} {p50 * 1000:8.2f} {pct(xs, 0.95) * 1000:8.2f} {p50 / floor:8.2f}")


def bench_page(home: Home, url_for: Callable[[], str], base: str, cookie: str, vms: int, loads: int) -> None:
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.ui.browser import ARGS, CHROMIUM

    results: dict[str, list[float]] = {"banger vm ls": [], "GET /api/vms": [], "VMs page, 20 rows": []}
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page()
        page.goto(url_for())
        page.wait_for_selector("#vm-rows tr[data-vm]")
        with httpx.Client(base_url=base, cookies={"banger_ui": cookie}, timeout=30) as client:
            for _ in range(loads):
                results["banger vm ls"].append(timed([BANGER, "vm", "ls"], home.env))
                start = time.perf_counter()
                assert len(client.get("/api/vms").json()) == vms
                results["GET /api/vms"].append(time.perf_counter() - start)
                start = time.perf_counter()
                page.goto(base + "/?reload", wait_until="commit")
                page.wait_for_function(f"document.querySelectorAll('#vm-rows tr[data-vm]').length === {vms}")
                results["VMs page, 20 rows"].append(time.perf_counter() - start)
        browser.close()
    floor = statistics.median(results["banger vm ls"])
    print(f"\nVMs page with {vms} VMs ({loads} loads, interleaved with the CLI)")
    print(f"{'what':<22} {'p50 ms':>8} {'p95 ms':>8} {'x vm ls':>8}")
    for name, xs in results.items():
        p50 = statistics.median(xs)
        print(f"{name:<22} {p50 * 1000:8.1f} {pct(xs, 0.95) * 1000:8.1f} {p50 / floor:8.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100, help="keys per side (each a letter or its erase)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--vms", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (banger's QEMU driver and image builds need it here)")
    cleanup_on_signals()
    with banger_home() as home, tempfile.TemporaryDirectory() as runtime:
        log(f"state root {home.path}; building image {IMAGE} (warm bootstrap cache)")
        home.banger("image", "build", IMAGE, "--preset", PRESET)
        print(f"host load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        with ui_server(home, Path(runtime)) as first_url:
            base, cookie = login(first_url)

            def fresh() -> str:
                return home.banger("ui", "url").stdout.strip()

            log("booting vm0 for the terminal")
            home.create("vm0", 512)
            home.env["XDG_RUNTIME_DIR"] = runtime  # `banger ui url` finds this UI
            bench_keys(home, base, cookie, args.rounds, args.keys)
            home.remove("vm0")
            log(f"creating {args.vms} VMs with --no-start")
            for i in range(args.vms):
                home.vms.append(f"idle{i}")
                home.banger("vm", "create", "--no-start", "--name", f"idle{i}", "--kernel", KERNEL, "--image", IMAGE)
            bench_page(home, fresh, base, cookie, args.vms, args.loads)
        print(f"\nhost load average at end: {os.getloadavg()[0]:.1f}; other tenants' load makes single runs swing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
