"""The click command tree; subcommand modules load on first use."""

from __future__ import annotations

import importlib
import importlib.util

import click

# Subcommands are imported on first use so that `banger version` stays fast.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "version": ("banger.cli.daemon_cmds", "version"),
    "daemon": ("banger.cli.daemon_cmds", "daemon"),
    "kernel": ("banger.cli.kernel_cmds", "kernel"),
    "image": ("banger.cli.image_cmds", "image"),
    "vm": ("banger.cli.vm_cmds", "vm"),
    "doctor": ("banger.cli.vm_cmds", "doctor"),
    "ssh-config": ("banger.cli.tunnel_cmds", "ssh_config"),
    "network": ("banger.cli.net_cmds", "network"),
    "ui": ("banger.cli.ui_cmds", "ui"),
    "events": ("banger.cli.events_cmds", "events"),
    "session": ("banger.cli.session_cmds", "session"),
    "snapshot": ("banger.cli.snapshot_cmds", "snapshot"),
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
