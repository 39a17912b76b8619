"""The hottest commands on a path that skips click: `version` and `daemon status` (os, json, socket only), and the
plainest `vm exec NAME -- CMD...` and `vm show NAME [--json]` (plus the RPC client, against a daemon that already
runs this code; anything else, an error to explain included, goes to the full CLI).

`banger` is run in loops by scripts and agents; click, typing and dataclasses alone cost several times a bare
interpreter start. `version` and `daemon status` are implemented here once (the click commands delegate to them);
the two `vm` forms send exactly the call their click commands send.
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


def _connected() -> Any:
    """A handshaken client of a daemon that runs this very code, or None: then the full CLI takes over (it starts
    the daemon, replaces a stale one, or says why this user may not use it)."""
    from banger.errors import BangerError
    from banger.rpc.client import Client

    path = os.path.join(state_home(), "run", "bangerd.sock")
    if not os.path.exists(path):
        return None
    client = Client(path)
    try:
        client.connect(across_versions=True)
    except (BangerError, OSError):
        client.close()
        return None
    if not client.same_code:
        client.close()
        return None
    return client


def _error(exc: Any) -> int:
    sys.stderr.write(f"error: {exc.message}\n" + (f"hint: {exc.hint}\n" if exc.hint else ""))
    return 1


def vm_exec(name: str, argv: list[str]) -> int | None:
    """`banger vm exec NAME -- CMD...` (no options): output streamed, the command's exit code returned."""
    client = _connected()
    if client is None:
        return None
    from banger.cli.stream import stream_call
    from banger.errors import BangerError

    params: dict[str, Any] = {"name": name, "argv": argv, "env": {}, "cwd": None, "user": None, "tty": False}
    params.update(rows=24, cols=80, stdin=False)
    try:
        result = stream_call(client, "vm.exec", params, stdin=False, tty=False)
    except BangerError as exc:
        return _error(exc)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (the daemon cancelled the operation)\n")
        return 130
    finally:
        client.close()
    if result.get("signal"):
        return 128 + int(result["signal"])
    return int(result.get("exit_code") or 0)


# What `vm show NAME` prints, in this order (the full CLI's `vm show` prints the same list).
VM_SHOW_FIELDS = (
    "name",
    "id",
    "state",
    "reason",
    "vmm",
    "pid",
    "ip",
    "kernel",
    "image",
    "vcpus",
    "memory_mib",
    "disk_bytes",
    "created_at",
    "dir",
    "console_log",
)


def vm_show(name: str, as_json: bool) -> int | None:
    """`banger vm show NAME [--json]`."""
    client = _connected()
    if client is None:
        return None
    from banger.errors import BangerError

    try:
        info = client.call("vm.show", {"name": name})
    except BangerError as exc:
        return _error(exc)
    finally:
        client.close()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _kv([(k, "-" if info.get(k) is None else info.get(k)) for k in VM_SHOW_FIELDS])
    return 0


def try_fast(argv: list[str]) -> int | None:
    """Run argv on the fast path when it is one of FAST_COMMANDS, or the plainest `vm exec` or `vm show [--json]`;
    None means: use the full CLI."""
    if tuple(argv) in FAST_COMMANDS:
        as_json = argv[-1] == "--json"
        return version_cmd(as_json) if argv[0] == "version" else status_cmd(as_json)
    if len(argv) >= 5 and argv[:2] == ["vm", "exec"] and argv[3] == "--" and not argv[2].startswith("-"):
        return vm_exec(argv[2], argv[4:])
    if len(argv) in (3, 4) and argv[:2] == ["vm", "show"] and argv[3:] in ([], ["--json"]):
        if not argv[2].startswith("-"):
            return vm_show(argv[2], as_json=len(argv) == 4)
    return None
