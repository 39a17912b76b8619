"""The UI's HTTP API against a real daemon: login, Host/Origin refusals, errors, and the CLI's --json objects."""

from __future__ import annotations

import json
import signal
import stat
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.conftest import BangerEnv
from tests.kernels.pull.conftest import LoopbackServer, http_server  # noqa: F401  (fixture)
from tests.ui.catalog import serve_catalog
from tests.ui.conftest import UiServer, run_ui


def test_everything_needs_a_login(ui: UiServer) -> None:
    for path in ("/", "/api/vms", "/static/app.js", "/api/events", "/api/kernels"):
        resp = httpx.get(ui.base + path)
        assert resp.status_code == 401, path
        assert "banger ui url" in resp.json()["error"]
    page = httpx.get(ui.base + "/", headers={"Accept": "text/html"})  # a browser gets a page saying what to do
    assert page.status_code == 401 and "error: not logged in: open the URL `banger ui url` prints" in page.text
    bogus = httpx.get(ui.base + "/?token=abc.123.def")
    assert bogus.status_code == 401 and "not valid" in bogus.json()["error"]


def test_token_becomes_an_httponly_cookie_once(ui: UiServer) -> None:
    first = httpx.get(ui.login_url)
    assert first.status_code == 303 and first.headers["location"] == "/"
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = {"banger_ui": first.cookies["banger_ui"]}
    assert httpx.get(ui.base + "/api/vms", cookies=session).json() == []
    page = httpx.get(ui.base + "/", cookies=session)
    assert page.status_code == 200 and "/static/app.js" in page.text
    reused = httpx.get(ui.login_url)  # one-time: the browser that opened it holds the session now
    assert reused.status_code == 401 and "already used" in reused.json()["error"]
    fresh = ui.fresh_url()
    assert fresh != ui.login_url and httpx.get(fresh).status_code == 303


def test_ui_url_names_the_newest_running_ui(daemon: BangerEnv, tmp_path: Path) -> None:
    runtime = tmp_path / "xdg"
    with run_ui(daemon, runtime) as first:
        with run_ui(daemon, runtime) as second:
            files = list((runtime / "banger").glob("ui-*.json"))
            assert len(files) == 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
            assert second.fresh_url().startswith(second.base + "/?token=")
            second.proc.send_signal(signal.SIGTERM)  # a terminated UI cleans up too
            second.proc.wait(15)
            assert len(list((runtime / "banger").glob("ui-*.json"))) == 1
            assert first.fresh_url().startswith(first.base + "/?token=")
    assert not list((runtime / "banger").glob("ui-*.json"))
    gone = daemon.cli("ui", "url")
    assert gone.returncode == 1 and "error: no banger ui is running" in gone.stderr


def test_a_busy_port_is_a_clear_error(ui: UiServer) -> None:
    busy = ui.benv.cli("ui", "--port", str(ui.port), "--no-open")
    assert busy.returncode == 1 and busy.stdout == ""
    assert busy.stderr.startswith(f"error: cannot listen on 127.0.0.1:{ui.port}: Address already in use")


def test_foreign_host_is_refused_even_when_logged_in(ui: UiServer) -> None:
    with ui.client() as client:
        assert client.get("/api/vms").status_code == 200
        assert client.get("/api/vms", headers={"Host": f"localhost:{ui.port}"}).status_code == 200
        for host in ("evil.example", f"evil.example:{ui.port}", "127.0.0.2", ""):
            resp = client.get("/api/vms", headers={"Host": host})
            assert resp.status_code == 403, host
        # a cross-origin write, even with the cookie (another site or another port of this host)
        for origin in ("http://evil.example", f"http://localhost:{ui.port + 1}"):
            resp = client.post("/api/vms", json={"no_start": True}, headers={"Origin": origin})
            assert resp.status_code == 403 and "cross-origin" in resp.json()["error"]


def test_websocket_checks_origin(ui: UiServer) -> None:
    with ui.client() as client:
        cookie = f"banger_ui={client.cookies['banger_ui']}"
    url = f"ws://127.0.0.1:{ui.port}/api/vms/nope/terminal"
    for origin in (None, "http://evil.example", f"http://127.0.0.1:{ui.port + 1}"):
        with pytest.raises(InvalidStatus) as exc:
            ws_connect(url, origin=origin, additional_headers={"Cookie": cookie}, open_timeout=10)  # type: ignore[arg-type]
        assert exc.value.response.status_code == 403, origin
    with pytest.raises(InvalidStatus) as noauth:
        ws_connect(url, origin=f"http://127.0.0.1:{ui.port}", open_timeout=10)  # type: ignore[arg-type]
    assert noauth.value.response.status_code == 403  # refused before accept: the handshake fails
    with ws_connect(url, origin=f"http://127.0.0.1:{ui.port}", additional_headers={"Cookie": cookie}) as ws:  # type: ignore[arg-type]
        msg = json.loads(ws.recv(timeout=30))
    assert msg["error"] == "no VM named 'nope'"


def test_daemon_errors_read_as_the_cli_prints_them(ui: UiServer) -> None:
    cli = ui.benv.cli("vm", "show", "nope")
    with ui.client() as client:
        resp = client.get("/api/vms/nope")
        assert resp.status_code == 404
        body = resp.json()
        assert cli.stderr.splitlines() == [f"error: {body['error']}", f"hint: {body['hint']}"]
        bad = client.post("/api/vms", json={"vcpus": "many"})
        assert bad.status_code == 400 and bad.json() == {"error": "create option vcpus must be int, got str"}
        odd = client.post("/api/vms", json={"colour": "red"})
        assert odd.status_code == 400 and "unknown create option(s): colour" in odd.json()["error"]
        sessions = client.get("/api/vms/nope/sessions")  # the daemon's own "not found", as the CLI shows it
        assert sessions.status_code == 404 and "nope" in sessions.json()["error"], sessions.json()
        send = client.post("/api/vms/nope/sessions/s1/send", json={"text": "hi"})
        assert send.status_code == 404 and "nope" in send.json()["error"], send.json()
        logs = client.get("/api/vms/nope/sessions/s1/logs")  # server-sent events: the failure is an event
        assert logs.status_code == 200 and "event: failure" in logs.text and "nope" in logs.text
        ui.benv.stop_daemon()
        down = client.get("/api/vms")
        assert down.status_code == 503 and "not running" in down.json()["error"]


def test_api_objects_are_the_cli_json(
    daemon: BangerEnv,
    tmp_path: Path,
    http_server: LoopbackServer,  # noqa: F811
) -> None:
    daemon.env["BANGER_CATALOG"] = str(serve_catalog(http_server, tmp_path / "c.json", ["k1", "k2"]))
    with run_ui(daemon, tmp_path / "xdg") as server, server.client() as client:
        pulled = client.post("/api/kernels/k1/pull", json={})
        assert pulled.status_code == 200
        by_cli = json.loads(daemon.cli("kernel", "pull", "k2", "--json", check=True).stdout)
        assert pulled.json()["name"] == "k1" and pulled.json().keys() == by_cli.keys()
        again = client.post("/api/kernels/k1/pull", json={})
        assert again.status_code == 409 and "already installed" in again.json()["error"]
        for path, argv in (
            ("/api/kernels", ["kernel", "list", "--json"]),
            ("/api/kernels?available=1", ["kernel", "list", "--available", "--json"]),
            ("/api/images", ["image", "list", "--json"]),
            ("/api/vms", ["vm", "ls", "--json"]),
        ):
            assert client.get(path).json() == json.loads(daemon.cli(*argv, check=True).stdout), path
        states = {k["name"]: k["state"] for k in client.get("/api/kernels?available=1").json()}
        assert states == {"k1": "pulled", "k2": "pulled"}
        assert client.delete("/api/kernels/k1").json() == {"removed": "k1"}
        assert [k["name"] for k in client.get("/api/kernels").json()] == ["k2"]


def test_without_a_daemon_the_ui_serves_and_says_so(banger_env: BangerEnv, tmp_path: Path) -> None:
    banger_env.env["BANGER_NO_AUTOSTART"] = "1"
    with run_ui(banger_env, tmp_path / "xdg") as server, server.client() as client:
        resp = client.get("/api/vms")
        assert resp.status_code == 503
        assert resp.json() == {
            "error": f"the banger daemon is not running (socket {banger_env.socket})",
            "hint": "start it with `banger daemon start`",
        }
    assert banger_env.daemon_pid() is None
