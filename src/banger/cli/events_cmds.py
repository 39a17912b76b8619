"""`banger events`: the daemon's event stream (VM state, operation progress, session output) as it happens."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from banger.cli.common import json_option
from banger.cli.connect import connect
from banger.config import Paths


def describe(event: dict[str, Any]) -> str:
    """One event as a readable line."""
    stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("time", 0))))
    kind = str(event.get("type", "?"))
    if kind.startswith("vm."):
        reason = f" ({event['reason']})" if event.get("reason") else ""
        return f"{stamp} {kind:<11} {event.get('vm')}: {event.get('state')}{reason}"
    if kind == "op.progress":
        count = f" {event['done']}/{event['total']} {event.get('unit', '')}" if event.get("total") else ""
        return f"{stamp} {kind:<11} {event.get('op')} {event.get('name')}: {event.get('step')}{count}"
    if kind in ("op.start", "op.done"):
        outcome = "" if kind == "op.start" else (" ok" if event.get("ok") else f" failed: {event.get('error')}")
        return f"{stamp} {kind:<11} {event.get('op')} {event.get('name')}{outcome}"
    if kind == "lost":
        return f"{stamp} lost {event.get('count')} events (this reader fell behind)"
    rest = {k: v for k, v in event.items() if k not in ("type", "time")}
    return f"{stamp} {kind:<11} {json.dumps(rest, sort_keys=True)}"


@click.command()
@json_option
def events(as_json: bool) -> None:
    """Print the daemon's events as they happen (JSON Lines with --json); Ctrl-C stops."""
    client = connect(Paths.from_env())
    try:

        def show(_method: str, params: dict[str, Any]) -> None:
            event = params.get("event")
            if not isinstance(event, dict) or event.get("type") == "subscribed":
                return
            click.echo(json.dumps(event, sort_keys=True) if as_json else describe(event))

        try:
            client.call("daemon.events", {}, on_notify=show, cancel_grace=2.0)
        except KeyboardInterrupt:
            return
    finally:
        client.close()
