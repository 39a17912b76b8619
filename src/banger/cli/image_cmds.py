"""`banger image ...`: root filesystem images."""

from __future__ import annotations

import os
from pathlib import Path

import click

from banger.cli.common import json_option, rpc
from banger.cli.output import emit_json, kv, table


@click.group()
def image() -> None:
    """Root filesystem images: build from presets, import, list, remove."""


@image.command()
@click.argument("name")
@click.option("--preset", type=click.Choice(["debian", "alpine", "void"]), default="debian", show_default=True)
@click.option("--suite", default=None, help="Distribution release (debian: bookworm; alpine: v3.20; ...).")
@click.option("--mirror", default=None, help="Package mirror URL.")
@click.option("--packages", default="", help="Extra packages, comma separated.")
@click.option("--size", default=None, help="Image size, e.g. 4G (default: 2G, or what the rootfs needs).")
@click.option("--force", is_flag=True, help="Rebuild an existing image.")
@json_option
def build(
    name: str,
    preset: str,
    suite: str | None,
    mirror: str | None,
    packages: str,
    size: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Build an image from a preset (mmdebstrap for debian; no mounts, no loop devices)."""
    params = {
        "name": name,
        "preset": preset,
        "suite": suite,
        "mirror": mirror,
        "packages": [p.strip() for p in packages.split(",") if p.strip()],
        "size": size,
        "force": force,
    }
    info = rpc("image.build", params, progress=not as_json)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"built image {info['name']} ({info['size']}, {info['source']})")


@image.command("import")
@click.argument("name")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--size", default=None, help="Image size, e.g. 4G (default: what the rootfs needs).")
@click.option("--force", is_flag=True, help="Replace an existing image.")
@json_option
def import_(name: str, source: Path, size: str | None, force: bool, as_json: bool) -> None:
    """Import a root filesystem (tarball such as `docker export` output, or a directory) as an image."""
    params = {"name": name, "source": os.path.abspath(source), "size": size, "force": force}
    info = rpc("image.import", params, progress=not as_json)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"imported image {info['name']} ({info['size']})")


@image.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List images."""
    rows = rpc("image.list")
    if as_json:
        emit_json(rows)
        return
    table(
        rows,
        [("name", "NAME"), ("source", "SOURCE"), ("suite", "SUITE"), ("size", "SIZE"), ("built_at", "CREATED")],
        empty="no images (build one with `banger image build NAME --preset debian`)",
    )


@image.command()
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Show one image."""
    info = rpc("image.show", {"name": name})
    if as_json:
        emit_json(info)
        return
    kv(
        [
            ("name", info["name"]),
            ("source", info["source"]),
            ("preset", info.get("preset")),
            ("suite", info.get("suite")),
            ("packages", ", ".join(info.get("packages") or []) or "-"),
            ("arch", info.get("arch")),
            ("size", info["size"]),
            ("created", info.get("built_at")),
            ("path", info["path"]),
            ("used by", ", ".join(info.get("used_by") or []) or "-"),
        ]
    )


@image.command()
@click.argument("name")
def rm(name: str) -> None:
    """Remove an image (refused while a VM uses it)."""
    rpc("image.rm", {"name": name})
    click.echo(f"removed image {name}")


image.add_command(list_, name="ls")  # as `vm ls` and `snapshot ls`; `list` stays the documented one
