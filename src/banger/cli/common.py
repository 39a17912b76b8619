"""Helpers shared by CLI commands: one RPC call with progress, and the --json option."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from banger.cli.connect import connect
from banger.cli.output import ProgressRenderer, progress_notify
from banger.config import Paths

F = TypeVar("F", bound=Callable[..., Any])


def json_option(fn: F) -> F:
    """Add `--json` (machine-readable output) to a command."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def rpc(
    method: str,
    params: dict[str, Any] | None = None,
    *,
    progress: bool = False,
    autostart: bool = True,
    across_versions: bool = False,
) -> Any:
    """Call one daemon method, rendering its progress notifications when asked (see connect for the flags)."""
    client = connect(Paths.from_env(), autostart=autostart, across_versions=across_versions)
    try:
        if not progress:
            return client.call(method, params or {})
        with ProgressRenderer() as renderer:
            return client.call(method, params or {}, on_notify=progress_notify(renderer))
    finally:
        client.close()
