"""`banger vm workspace ...`, `banger vm tooling plan`, and the workspace steps of `vm create` / `vm run`.

Host-side git runs here, in the CLI, as the calling user (banger.workspace.hostgit); the daemon only moves bytes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from banger.cli.common import json_option, rpc
from banger.cli.connect import connect
from banger.cli.output import ProgressRenderer, emit_json, kv, table
from banger.config import Paths
from banger.errors import BangerError, InvalidInputError
from banger.workspace import hostgit
from banger.workspace.tooling import ToolingPlan, plan

EXPORT_REF = "refs/banger/export"
MAX_EXPORT = 8 * 1024 * 1024 * 1024


def find_checkout(path: str | None) -> Path | None:
    """The checkout `--workspace PATH` names (an error if it is not one), or the one we are in (None if not)."""
    if path is None:
        return hostgit.toplevel(Path.cwd())
    top = hostgit.toplevel(Path(path).resolve())
    if top is None:
        raise InvalidInputError(f"{path} is not inside a git checkout")
    return top


def upload(vm_name: str, top: Path, *, user: str | None = None) -> dict[str, Any]:
    """Snapshot the checkout, bundle it and stream it into VM `vm_name`'s /workspace/<basename>."""
    click.echo(f"workspace: snapshot and bundle of {top}", err=True)
    snap = hostgit.make_snapshot(top, vm_name)
    if snap.submodules:
        click.echo(
            f"warning: submodules are not copied into the workspace ({', '.join(snap.submodules)}); "
            "clone them in the guest if you need them",
            err=True,
        )
    git_name, git_email = hostgit.identity(top)
    params = {
        "name": vm_name,
        "basename": top.name,
        "host_path": str(top),
        "base_commit": snap.commit,
        "base_ref": snap.ref,
        "head_commit": snap.head,
        "branch": snap.branch,
        "git_name": git_name,
        "git_email": git_email,
        "user": user,
    }
    from banger.cli.transfer import upload_call

    try:
        with tempfile.TemporaryDirectory(prefix="banger-ws-") as tmp:
            bundle = Path(tmp) / "workspace.bundle"
            hostgit.make_bundle(snap, bundle)
            client = connect(Paths.from_env())
            try:
                with ProgressRenderer() as render:
                    result: dict[str, Any] = upload_call(
                        client, "vm.workspace.import", params, bundle, step="workspace upload", render=render
                    )
            finally:
                client.close()
    except BaseException:
        hostgit.drop_ref(top, snap.ref)
        raise
    click.echo(f"workspace {top} -> {vm_name}:{result['guest_path']} (base {snap.commit[:12]})", err=True)
    return result


def _fetch_guest_work(vm_name: str, top: Path, into: Path, dest_ref: str) -> tuple[dict[str, Any], str]:
    """Bring the guest's work into `into` as `dest_ref` (objects fsck-checked); returns (summary, tip)."""
    from banger.cli.transfer import download_call

    with tempfile.TemporaryDirectory(prefix="banger-export-") as tmp:
        bundle = Path(tmp) / "export.bundle"
        client = connect(Paths.from_env())
        try:
            with bundle.open("wb") as sink, ProgressRenderer() as render:
                info: dict[str, Any] = download_call(
                    client,
                    "vm.workspace.export",
                    {"name": vm_name},
                    sink,
                    limit=MAX_EXPORT,
                    step="workspace download",
                    render=render,
                )
        finally:
            client.close()
        if not info.get("bundle"):
            tip = str(info["head_commit"])
            hostgit.git(into, "update-ref", dest_ref, tip)
            return info, tip
        with hostgit.checked_objects(top, bundle, EXPORT_REF) as scratch:
            return info, hostgit.fetch_checked(scratch, into, EXPORT_REF, dest_ref)


def _host_repo(vm_name: str) -> tuple[dict[str, Any], Path]:
    ws: dict[str, Any] = rpc("vm.workspace.show", {"name": vm_name})
    top = Path(ws["host_path"])
    if hostgit.toplevel(top) != top:
        raise InvalidInputError(f"the workspace's host checkout {top} is gone or no longer a git checkout")
    return ws, top


def export(vm_name: str, branch: str | None, *, force: bool) -> dict[str, Any]:
    """Make the guest's work (commits + uncommitted changes) branch BRANCH of the host checkout."""
    ws, top = _host_repo(vm_name)
    branch = branch or f"banger/{vm_name}"
    hostgit.check_branch_name(top, branch)
    if hostgit.branch_exists(top, branch) and not force:
        raise InvalidInputError(f"branch {branch} already exists in {top}", hint="pass --force to replace it")
    staging = f"refs/banger/{vm_name}/export"
    info, tip = _fetch_guest_work(vm_name, top, top, staging)
    try:
        hostgit.set_branch(top, branch, tip, force=force)
    finally:
        hostgit.drop_ref(top, staging)
    stat = hostgit.diffstat(top, ws["base_commit"], tip)
    return {
        "branch": branch,
        "commit": tip,
        "base_commit": ws["base_commit"],
        "commits_ahead": info.get("commits_ahead"),
        "changed_files": info.get("changed_files"),
        "diffstat": stat,
    }


def print_export(result: dict[str, Any]) -> None:
    """The human summary of an export: branch, commit, diffstat."""
    click.echo(f"branch {result['branch']} at {result['commit']}")
    click.echo(result["diffstat"].rstrip() or " (no changes)")


@click.group()
def workspace() -> None:
    """A VM's workspace: its changes out as a branch, a diff, or a status."""


@workspace.command("export")
@click.argument("name")
@click.option("--branch", default=None, help="Branch to create (default: banger/NAME).")
@click.option("--force", is_flag=True, help="Replace the branch if it exists.")
@json_option
def export_cmd(name: str, branch: str | None, force: bool, as_json: bool) -> None:
    """Bring the guest's commits and uncommitted changes back as a branch of the host checkout."""
    result = export(name, branch, force=force)
    if as_json:
        emit_json(result)
    else:
        print_export(result)


@workspace.command("diff")
@click.argument("name")
@click.option("--stat", is_flag=True, help="Only the diffstat.")
def diff_cmd(name: str, stat: bool) -> None:
    """Show the guest's changes against the base as `git diff` would (no branch is created)."""
    ws, top = _host_repo(name)
    with hostgit.scratch_clone(top) as view:
        _info, tip = _fetch_guest_work(name, top, view, "refs/banger/diff")
        sys.stdout.flush()
        hostgit.show_diff(view, ws["base_commit"], tip, stat=stat)


@workspace.command("status")
@click.argument("name")
@json_option
def status_cmd(name: str, as_json: bool) -> None:
    """How far the guest's work is from the base: commits ahead and changed files."""
    info = rpc("vm.workspace.status", {"name": name})
    if as_json:
        emit_json(info)
        return
    kv(
        [
            ("host path", info["host_path"]),
            ("guest path", info["guest_path"]),
            ("base commit", info["base_commit"]),
            ("commits ahead", info["commits_ahead"]),
            ("changed files", info["changed_files"]),
        ]
    )
    for change in info["changes"]:
        click.echo(f"  {change['status']:<5} {change['path']}")


@click.group()
def tooling() -> None:
    """What a checkout needs installed in its VM."""


@tooling.command("plan")
@click.argument("path", required=False, default=None)
@json_option
def plan_cmd(path: str | None, as_json: bool) -> None:
    """The tooling plan of a checkout (default: the one we are in): tool, version, which file asked, how."""
    root = Path(path).resolve() if path else (hostgit.toplevel(Path.cwd()) or Path.cwd())
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a directory")
    p = plan(root)
    if as_json:
        emit_json(p.to_json())
        return
    rows = [{**i.to_json(), "installs": i.installs or i.command or "-"} for i in p.items]
    table(
        rows,
        [("tool", "TOOL"), ("version", "VERSION"), ("source", "SOURCE"), ("via", "VIA"), ("installs", "INSTALLS")],
        empty=f"nothing to install for {root}",
    )
    for warning in p.warnings:
        click.echo(f"warning: {warning}", err=True)


def workspace_image(image: str | None, tooling_plan: ToolingPlan | None) -> str:
    """The image to boot: `image` plus git when it lacks it and the plan's packages (a cached derived image)."""
    packages = tooling_plan.packages if tooling_plan else []
    if tooling_plan:
        for warning in tooling_plan.warnings:
            click.echo(f"warning: {warning}", err=True)
    res = rpc("vm.workspace.image", {"image": image, "packages": packages}, progress=True)
    if res["derived"]:
        click.echo(f"image {res['image']} ({res['base_image']} + {' '.join(res['packages'])})", err=True)
    return str(res["image"])


def run_setup(vm_name: str, commands: list[str]) -> None:
    """Run the plan's setup commands in the workspace, output shown; the first failure stops with an error."""
    from banger.cli.vm_cmds import run_exec

    for i, cmd in enumerate(commands, 1):
        click.echo(f"setup [{i}/{len(commands)}]: {cmd}", err=True)
        code = run_exec(vm_name, ["/bin/sh", "-c", cmd], tty=False, interactive=False, env={}, workdir=None, user=None)
        if code != 0:
            raise BangerError(f"setup command failed with exit code {code}: {cmd}")


def export_before_rm(vm_name: str) -> bool:
    """`vm run --rm`: export the guest's work as banger/NAME; False (and the VM is kept) when that fails."""
    try:
        result = export(vm_name, None, force=False)
    except BangerError as exc:
        click.echo(f"error: exporting the workspace failed: {exc.message}", err=True)
        click.echo(
            f"keeping VM {vm_name} so no work is lost: `banger vm workspace export {vm_name}`, then `banger vm rm -f "
            f"{vm_name}`",
            err=True,
        )
        return False
    click.echo(f"exported: branch {result['branch']} at {result['commit']}", err=True)
    click.echo(result["diffstat"].rstrip() or " (no changes)", err=True)
    return True


def plan_of(top: Path) -> ToolingPlan:
    """The tooling plan of checkout `top`."""
    return plan(top)
