"""Every listing answers to both `ls` and `list`, and every listing has --json (the brief's rule)."""

from __future__ import annotations

import click

from banger.cli.app import cli


def test_every_listing_answers_to_ls_and_list_with_json() -> None:
    ctx = click.Context(cli)
    groups = ("vm", "image", "kernel", "snapshot", "session")
    for name in groups:
        group = cli.get_command(ctx, name)
        assert isinstance(group, click.Group), name
        ls, list_ = group.get_command(ctx, "ls"), group.get_command(ctx, "list")
        assert ls is not None and ls is list_, f"banger {name}: `ls` and `list` differ"
        assert "--json" in [opt for p in ls.params for opt in p.opts], f"banger {name} ls has no --json"
