"""The hottest read-only commands (`version`, `daemon status`) on a path that imports only os, json, socket.

`banger` is run in loops by scripts and agents; click, typing and dataclasses alone cost several times a bare
interpreter start. These two commands are implemented here once; the click commands delegate to them.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from banger import PROTOCOL_VERSION, __version__

TYPE_CHECKING = False  # typing costs milliseconds on the CLI's fast path; mypy still sees the import
if TYPE_CHECKING:
    from typing import Any

FAST_COMMANDS = {("version",), ("version", "--json"), ("daemon", "status"), ("daemon", "status", "--json")}


def system_home() -> str:
    """The system daemon's state root (BANGER_SYSTEM_HOME moves it, for tests)."""
    return os.path.abspath(os.environ.get("BANGER_SYSTEM_HOME") or "/var/lib/banger")


def system_socket_present() -> bool:
    """Whether this host has a system daemon: its socket's directory is there (found, or hidden from this user:
    EACCES means it exists). Then users talk to it (or are told why they may not), never to a daemon of their own."""
    try:
        os.stat(os.path.join(system_home(), "run"))
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def state_home() -> str:
    """BANGER_HOME, else the system root for root and for users when a system daemon's socket is there, else the
    user's XDG data dir (see config.Paths)."""
    env = os.environ.get("BANGER_HOME")
    if env:
        return os.path.abspath(env)
    if os.geteuid() == 0 or system_socket_present():
        return system_home()
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "banger")


def _daemon_status(home: str) -> dict[str, Any] | None:
    """daemon.status over a raw connection, or None when no daemon answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(os.path.join(home, "run", "bangerd.sock"))
        hello = {"jsonrpc": "2.0", "id": 1, "method": "rpc.hello"}
        hello["params"] = {"version": __version__, "protocol": PROTOCOL_VERSION}
        status = {"jsonrpc": "2.0", "id": 2, "method": "daemon.status", "params": {}}
        sock.sendall(json.dumps(hello).encode() + b"\n" + json.dumps(status).encode() + b"\n")
        f = sock.makefile("rb")
        replies = [json.loads(f.readline()), json.loads(f.readline())]
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except PermissionError:
        raise SystemExit(_denied(home)) from None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot talk to the daemon: {exc}") from exc
    finally:
        sock.close()
    # The handshake may fail (a daemon of another protocol); daemon.status is served across versions regardless,
    # so only its reply decides (a caller the daemon refuses gets the refusal there too).
    reply = replies[1]
    if "error" in reply:
        hint = (reply["error"].get("data") or {}).get("hint")
        raise SystemExit(f"error: {reply['error']['message']}" + (f"\nhint: {hint}" if hint else ""))
    result: dict[str, Any] = replies[1]["result"]
    return result


def _denied(home: str) -> str:
    from banger.cli.access import denied_message

    message, hint = denied_message(home)
    return f"error: {message}\nhint: {hint}"


def _kv(pairs: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs) + 1
    sys.stdout.write("".join(f"{k + ':':<{width}} {v}\n" for k, v in pairs))


def version_cmd(as_json: bool) -> int:
    """`banger version`: CLI and daemon version, commit, build date."""
    from banger.buildinfo import build_info, code_id

    info = build_info()
    cli = {"version": info.version, "commit": info.commit, "build_date": info.date, "build": code_id()}
    try:
        status = _daemon_status(state_home())
    except SystemExit:  # a daemon this user may not use: the CLI's own version still stands
        status = None
    daemon = None
    if status:
        daemon = {
            "version": status["version"],
            "commit": status.get("commit"),
            "build_date": status.get("build_date"),
            "build": status.get("build"),
        }
    if as_json:
        print(
            json.dumps(
                {"cli": cli, "daemon": daemon, "same_code": bool(daemon and daemon["build"] == cli["build"])}, indent=2
            )
        )
        return 0

    def line(v: dict[str, Any] | None) -> str:
        if v is None:
            return "not running"
        return (
            f"{v['version']} (commit {(v['commit'] or 'unknown')[:12]}, build {v['build'] or 'unknown'}, "
            f"built {v['build_date'] or 'unknown'})"
        )

    pairs = [("cli", line(cli)), ("daemon", line(daemon))]
    if daemon is not None and daemon["build"] != cli["build"]:
        pairs.append(("note", "the daemon runs other code; the next command restarts it (or `banger daemon stop`)"))
    _kv(pairs)
    return 0


def status_cmd(as_json: bool) -> int:
    """`banger daemon status`: exit 0 when running, 3 when not."""
    home = state_home()
    info = _daemon_status(home)
    if info is None:
        info = {"running": False, "home": home, "socket": os.path.join(home, "run", "bangerd.sock")}
    if as_json:
        print(json.dumps(info, indent=2))
    elif not info["running"]:
        print(f"bangerd is not running (home {home})")
    else:
        _kv(
            [
                ("status", "running"),
                ("pid", info["pid"]),
                ("version", info["version"]),
                ("uptime", f"{info['uptime_s']:.0f}s"),
                ("home", info["home"]),
                ("socket", info["socket"]),
                ("log", info["log"]),
                ("in-flight calls", info["inflight"]),
            ]
        )
    return 0 if info["running"] else 3


def try_fast(argv: list[str]) -> int | None:
    """Run argv on the fast path when it is one of FAST_COMMANDS; None means: use the full CLI."""
    if tuple(argv) not in FAST_COMMANDS:
        return None
    as_json = argv[-1] == "--json"
    return version_cmd(as_json) if argv[0] == "version" else status_cmd(as_json)
