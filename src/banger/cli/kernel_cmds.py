"""`banger kernel ...`: the kernel catalog and installed kernels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from banger.cli.common import json_option, rpc
from banger.cli.output import emit_json, kv, table


def catalog_env() -> str:
    """The CLI's BANGER_CATALOG, sent with every catalog call: the daemon may have been started with another one.

    "" says the CLI has none, so the daemon's config file decides.
    """
    value = os.environ.get("BANGER_CATALOG", "")
    if value and "://" not in value:
        value = os.path.abspath(value)
    return value


@click.group()
def kernel() -> None:
    """Guest kernels: pull from the catalog, import, build, bundle."""


@kernel.command("list")
@click.option("--available", is_flag=True, help="Show the catalog, with what is pulled.")
@json_option
def list_(available: bool, as_json: bool) -> None:
    """List installed kernels (or the catalog with --available)."""
    if available:
        cat = rpc("kernel.catalog", {"catalog": catalog_env()})
        if as_json:
            emit_json(cat["entries"])
            return
        table(
            cat["entries"],
            [
                ("name", "NAME"),
                ("distro", "DISTRO"),
                ("kernel_version", "VERSION"),
                ("size", "SIZE"),
                ("state", "STATE"),
                ("description", "DESCRIPTION"),
            ],
            empty=f"the catalog ({cat['origin']}) has no entries",
        )
        return
    rows = rpc("kernel.list")
    if as_json:
        emit_json(rows)
        return
    table(
        rows,
        [
            ("name", "NAME"),
            ("distro", "DISTRO"),
            ("kernel_version", "VERSION"),
            ("size", "SIZE"),
            ("source", "SOURCE"),
            ("created_at", "CREATED"),
        ],
        empty="no kernels installed (see `banger kernel list --available`)",
    )


@kernel.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace an installed kernel of that name.")
@json_option
def pull(name: str, force: bool, as_json: bool) -> None:
    """Download a kernel bundle from the catalog, verifying its sha256."""
    info = rpc("kernel.pull", {"name": name, "force": force, "catalog": catalog_env()}, progress=not as_json)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"pulled kernel {info['name']} ({info['kernel_version']}, sha256 {info['sha256'][:16]}...)")


@kernel.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Name to install it under.")
@click.option("--distro", default=None, help="Distribution label (default: custom).")
@click.option("--kernel-version", default=None, help="Kernel version (default: read from the image).")
@click.option("--force", is_flag=True, help="Replace an installed kernel of that name.")
@json_option
def import_(path: Path, name: str, distro: str | None, kernel_version: str | None, force: bool, as_json: bool) -> None:
    """Import a locally built kernel: a directory with vmlinux (+config, modules/, initrd.img) or a vmlinux."""
    params = {
        "path": os.path.abspath(path),
        "name": name,
        "distro": distro,
        "kernel_version": kernel_version,
        "force": force,
    }
    info = rpc("kernel.import", params, progress=not as_json)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"imported kernel {info['name']} ({info['kernel_version']})")


@kernel.command()
@click.option("--from", "source", type=click.Choice(["debian"]), default="debian", show_default=True)
@click.option("--name", default=None, help="Name to install it under (default: config default_kernel).")
@click.option("--package", default="linux-image-cloud-amd64", show_default=True, help="Debian kernel package.")
@click.option("--force", is_flag=True, help="Rebuild even if a kernel of that name exists.")
@json_option
def build(source: str, name: str | None, package: str, force: bool, as_json: bool) -> None:
    """Build a bootable kernel (vmlinux, modules, initramfs) from Debian's kernel package."""
    params = {"source": source, "name": name, "package": package, "force": force}
    info = rpc("kernel.build", params, progress=not as_json)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"built kernel {info['name']} ({info['kernel_version']}, {info['source']})")


@kernel.command()
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Show an installed kernel's manifest."""
    info = rpc("kernel.show", {"name": name})
    if as_json:
        emit_json(info)
        return
    boots = ", ".join(k for k, v in (info.get("boots_on") or {}).items() if v) or "unknown"
    kv(
        [
            ("name", info["name"]),
            ("distro", info["distro"]),
            ("arch", info["arch"]),
            ("version", info["kernel_version"]),
            ("sha256", info["sha256"]),
            ("source", info["source"]),
            ("size", info["size"]),
            ("created", info["created_at"]),
            ("boots on", boots),
            ("initrd", "yes" if info.get("has_initrd") else "no"),
            ("modules", "yes" if info.get("has_modules") else "no"),
            ("cmdline", info.get("cmdline")),
            ("path", info["path"]),
            ("used by", ", ".join(info.get("used_by") or []) or "-"),
        ]
    )


@kernel.command()
@click.argument("name")
def rm(name: str) -> None:
    """Remove an installed kernel (refused while a VM uses it)."""
    rpc("kernel.rm", {"name": name})
    click.echo(f"removed kernel {name}")


@kernel.command()
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle file (.tar.zst).")
@click.option("--url", default=None, help="URL the bundle will be served from (for the catalog entry).")
@json_option
def bundle(name: str, output: Path, url: str | None, as_json: bool) -> None:
    """Write an installed kernel as a .tar.zst bundle and print its catalog entry."""
    info = rpc("kernel.bundle", {"name": name, "output": os.path.abspath(output), "url": url})
    if as_json:
        emit_json(info)
    else:
        click.echo(json.dumps(info["entry"], indent=2))


kernel.add_command(list_, name="ls")  # as `vm ls` and `snapshot ls`; `list` stays the documented one
