"""`banger session ...`: long-running processes in a VM that outlive the CLI, the daemon and the agent."""

from __future__ import annotations

import signal as signalmod
import sys
from typing import Any

import click

from banger.cli.common import json_option, rpc
from banger.cli.output import emit_json, table
from banger.cli.vm_cmds import _env_pairs, _stream
from banger.errors import InvalidInputError

SESSION_COLUMNS = [
    ("vm", "VM"),
    ("name", "NAME"),
    ("kind", "KIND"),
    ("state", "STATE"),
    ("exit_code", "EXIT"),
    ("signal", "SIGNAL"),
    ("output_bytes", "OUTPUT"),
    ("started_at", "STARTED"),
    ("command", "COMMAND"),
]
DETACH_KEY = b"\x1d"  # Ctrl-]


def parse_signal(text: str) -> int:
    """'TERM', 'SIGTERM', 'term' or '15' -> 15."""
    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signalmod.Signals[name])
    except KeyError:
        raise InvalidInputError(f"unknown signal {text!r}", hint="e.g. TERM, INT, KILL or a number") from None


@click.group()
def session() -> None:
    """Long-running processes in a VM, owned by the guest (they outlive the CLI and the daemon)."""


@session.command(context_settings={"ignore_unknown_options": True})
@click.argument("vm")
@click.option("--name", default=None, help="Session name (default: a random adjective-noun).")
@click.option("-t", "--tty", is_flag=True, help="Give the process a pseudo-terminal (for `session attach`).")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE for the process's environment.")
@click.option("-u", "--user", default=None, help="User to run as in the guest.")
@click.option(
    "--restart",
    type=click.Choice(["no", "on-failure", "always"]),
    default="no",
    show_default=True,
    help="Restart the process when it exits (never beyond a VM stop).",
)
@click.option("--agent", type=click.Choice(["opencode"]), default=None, help="A conversation with the VM's agent.")
@click.option("--title", default=None, help="Title of the agent session.")
@json_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def start(
    vm: str,
    name: str | None,
    tty: bool,
    workdir: str | None,
    env: tuple[str, ...],
    user: str | None,
    restart: str,
    agent: str | None,
    title: str | None,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Start COMMAND in VM as a session: `banger session start VM -- CMD...`; prints the session's name.

    With --agent opencode (an agent VM): open a conversation with the agent instead (no COMMAND).
    """
    from banger.cli.stream import terminal_size

    if agent is None and not command:
        raise InvalidInputError("no command given", hint="banger session start VM -- CMD...")

    rows, cols = terminal_size(sys.stdout.fileno()) if tty else (24, 80)
    params = {
        "vm": vm,
        "argv": list(command),
        "name": name,
        "env": _env_pairs(env),
        "cwd": workdir,
        "user": user,
        "tty": tty,
        "rows": rows,
        "cols": cols,
        "restart": restart,
        "agent": agent,
        "title": title,
    }
    info = rpc("session.start", params)
    if as_json:
        emit_json(info)
    else:
        click.echo(info["name"])


@session.command("ls")
@click.argument("vm", required=False)
@json_option
def ls(vm: str | None, as_json: bool) -> None:
    """List sessions (of one VM, or of all)."""
    rows = rpc("session.list", {"vm": vm})
    if as_json:
        emit_json(rows)
        return
    shown = [{**r, "command": " ".join(r["command"])} for r in rows]
    table(shown, SESSION_COLUMNS, empty="no sessions (start one with `banger session start VM -- CMD`)")


@session.command()
@click.argument("vm")
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the session ends.")
@click.option("--json", "as_json", is_flag=True, help="An agent session's transcript as JSON Lines.")
def logs(vm: str, name: str, follow: bool, as_json: bool) -> None:
    """Print everything a session wrote (kept after the VM stops); an agent session's transcript."""
    params = {"vm": vm, "session": name, "follow": follow, "json_events": as_json}
    _stream("session.logs", params, stdin=False, tty=False)


@session.command()
@click.argument("vm")
@click.argument("name")
def attach(vm: str, name: str) -> None:
    """Join a session interactively; Ctrl-] detaches and leaves it running."""
    from banger.cli.stream import terminal_size

    tty = sys.stdin.isatty()
    rows, cols = terminal_size(sys.stdin.fileno()) if tty else (24, 80)
    if tty:
        click.echo(f"attached to {name}; Ctrl-] detaches", err=True)
    params = {"vm": vm, "session": name, "rows": rows, "cols": cols}
    result = _stream("session.attach", params, stdin=True, tty=tty, detach=DETACH_KEY)
    if result.get("detached"):
        if tty:
            click.echo("\r\ndetached", err=True)
        return
    if tty:
        click.echo(f"\r\nsession {name} ended", err=True)


@session.command()
@click.argument("vm")
@click.argument("name")
@click.argument("text", required=False)
@click.option("--no-newline", is_flag=True, help="Do not add a newline after TEXT.")
@click.option("--eof", is_flag=True, help="Close the session's stdin afterwards.")
@click.option("--wait", is_flag=True, help="Agent sessions: return once the agent is idle (exit 1 on an agent error).")
def send(vm: str, name: str, text: str | None, no_newline: bool, eof: bool, wait: bool) -> None:
    """Write TEXT and a newline to a session's stdin (RPC guest.session.send); to an agent session, a prompt."""
    if text is None and not eof:
        raise InvalidInputError("nothing to send: give TEXT or --eof")
    params = {"vm": vm, "session": name, "text": text, "newline": not no_newline, "eof": eof, "wait": wait}
    if not wait:
        rpc("guest.session.send", params)
        return
    sys.exit(prompt_and_wait(params))


def prompt_and_wait(params: dict[str, Any]) -> int:
    """Send a prompt and stream the turn's transcript until the agent is idle: 0, or 1 on an agent error.
    Ctrl-C cancels the call, which aborts the turn."""
    result = _stream("guest.session.send", params, stdin=False, tty=False)
    if result.get("aborted"):
        click.echo("aborted", err=True)
        return 130
    if result.get("error"):
        click.echo(f"error: the agent failed: {result['error']}", err=True)
        return 1
    return 0


@session.command()
@click.argument("vm")
@click.argument("name")
@click.option("--signal", "sig", default="TERM", show_default=True, help="Signal to send first.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds before SIGKILL.")
@json_option
def stop(vm: str, name: str, sig: str, timeout: float, as_json: bool) -> None:
    """Stop a session (no restarts): SIG, then SIGKILL after the timeout."""
    info = rpc("session.stop", {"vm": vm, "session": name, "signal": parse_signal(sig), "timeout": timeout})
    if as_json:
        emit_json(info)
    else:
        click.echo(f"stopped {name} ({_ending(info)})")


def _ending(info: dict[str, Any]) -> str:
    if info.get("signal"):
        try:
            return f"killed by {signalmod.Signals(int(info['signal'])).name}"
        except ValueError:
            return f"killed by signal {info['signal']}"
    if info.get("exit_code") is not None:
        return f"exit {info['exit_code']}"
    return str(info.get("state"))


@session.command()
@click.argument("vm")
@click.argument("name")
@click.option("-f", "--force", is_flag=True, help="Kill it first if it runs.")
def rm(vm: str, name: str, force: bool) -> None:
    """Remove a session and its output."""
    rpc("session.rm", {"vm": vm, "session": name, "force": force})
    click.echo(f"removed {name}")


session.add_command(ls, name="list")  # as `vm list`; `ls` stays the documented one
