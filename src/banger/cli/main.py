"""`banger`: the CLI. It only talks to the daemon; errors become `error: ...` lines and exit codes."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import click

from banger.errors import BangerError

# Subcommands are imported on first use so that `banger version` stays fast.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "version": ("banger.cli.daemon_cmds", "version"),
    "daemon": ("banger.cli.daemon_cmds", "daemon"),
    "kernel": ("banger.cli.kernel_cmds", "kernel"),
    "image": ("banger.cli.image_cmds", "image"),
    "vm": ("banger.cli.vm_cmds", "vm"),
    "doctor": ("banger.cli.vm_cmds", "doctor"),
    "network": ("banger.cli.net_cmds", "network"),
}


class LazyGroup(click.Group):
    """A click group whose subcommands live in modules imported on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n, (mod, _) in LAZY_COMMANDS.items() if importlib.util.find_spec(mod) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return None
        try:
            module = importlib.import_module(target[0])
        except ModuleNotFoundError:
            return None
        cmd: click.Command = getattr(module, target[1])
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="BANGER_DEBUG", help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """banger: microVMs for developers and coding agents."""
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> None:
    """Entry point of `banger`."""
    debug = "--debug" in (argv or sys.argv[1:]) or os.environ.get("BANGER_DEBUG") == "1"
    try:
        rv: Any = cli.main(args=argv, prog_name="banger", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # click turns Ctrl-C into Abort; by now the RPC client has had the daemon cancel the call.
        click.echo("error: interrupted (the daemon cancelled the operation)", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BangerError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
