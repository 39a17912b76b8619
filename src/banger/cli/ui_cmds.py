"""`banger ui`: the web UI, served as the calling user; `banger ui url` prints a fresh login URL for it."""

from __future__ import annotations

import os

import click

from banger.config import Paths


@click.group(invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=7070, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any).")
@click.option("--no-open", is_flag=True, help="Do not open a browser.")
@click.option(
    "--shell-grace",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="End a terminal shell no page has been attached to for this many seconds (0: never).",
)
@click.pass_context
def ui(ctx: click.Context, host: str, port: int, no_open: bool, shell_grace: float) -> None:
    """Serve the web UI; the first line printed is the login URL (a one-time token)."""
    if ctx.invoked_subcommand is not None:
        return
    from banger.cli.connect import connect
    from banger.errors import BangerError
    from banger.ui.server import serve

    paths = Paths.from_env()
    try:
        connect(paths).close()  # like any command, start the daemon when none answers (unless told not to)
    except BangerError as exc:
        click.echo(f"warning: {exc.message}; the UI shows this until the daemon answers", err=True)

    def ready(url: str) -> None:
        click.echo(url)
        click.echo("banger ui: serving; Ctrl-C stops it. `banger ui url` prints a fresh login URL.", err=True)
        if not no_open and (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("BROWSER")
        ):
            import webbrowser

            webbrowser.open(url)

    serve(paths.socket, host, port, ready, shell_grace=shell_grace)


@ui.command()
def url() -> None:
    """Print a fresh one-time login URL for the UI that is running."""
    from banger.ui.state import running_ui

    state = running_ui(Paths.from_env().socket)
    click.echo(state.url(state.mint()))
