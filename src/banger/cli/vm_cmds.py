"""`banger vm ...` and `banger doctor`."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from banger.cli import ssh_files, tunnel_cmds
from banger.cli.common import json_option, rpc
from banger.cli.confine_view import confinement_lines
from banger.cli.connect import connect
from banger.cli.netpolicy_opts import network_policy_options, network_policy_params
from banger.cli.output import emit_json, kv, table
from banger.config import Paths
from banger.errors import BangerError, InvalidInputError

# A login shell: bash where the image has it, else sh.
LOGIN_SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi"]

# Agent VM defaults: what opencode needs to start in reasonable time under TCG (each overridable).
AGENT_VCPUS = 2
AGENT_MEMORY_MIB = 2048

VM_COLUMNS = [
    ("name", "NAME"),
    ("state", "STATE"),
    ("vmm", "VMM"),
    ("ip", "IP"),
    ("vcpus", "CPUS"),
    ("memory_mib", "MEM(MiB)"),
    ("image", "IMAGE"),
    ("kernel", "KERNEL"),
    ("reason", "REASON"),
]


@click.command()
@json_option
def doctor(as_json: bool) -> None:
    """Report what this host can run (KVM, QEMU, Firecracker, vsock) and why."""
    rep = rpc("host.doctor")
    if as_json:
        emit_json(rep)
        return
    kv(
        [
            ("kvm", f"{'usable' if rep['kvm_usable'] else 'not usable'} ({rep['kvm_flavor']}): {rep['kvm_reason']}"),
            (
                "qemu",
                rep["qemu"]["version"]
                and f"{rep['qemu']['version']} at {rep['qemu']['path']}"
                or f"missing: {rep['qemu']['problem']}",
            ),
            (
                "firecracker",
                rep["firecracker"]["version"]
                and f"{rep['firecracker']['version']} at {rep['firecracker']['path']}"
                or f"missing: {rep['firecracker']['problem']}",
            ),
            ("vhost-vsock", "yes" if rep["vhost_vsock"] else "no (agent uses virtio-serial)"),
            ("qemu accel", rep["qemu_accel"]),
            ("vmm (auto)", rep["selected_vmm"] or rep.get("selected_vmm_problem")),
            *confinement_lines(rep.get("confinement")),
        ]
    )


@click.group()
def vm() -> None:
    """Create, run and reach microVMs."""


def _print_vm(info: dict[str, Any], as_json: bool, verb: str) -> None:
    if as_json:
        emit_json(info)
    else:
        click.echo(f"{verb} {info['name']} ({info['state']})")


def _create_params(opts: dict[str, Any], *, start: bool) -> dict[str, Any]:
    """vm.create params from the options `create_options` adds (click passes them as keyword arguments)."""
    return {
        "name": opts["name"],
        "image": opts["image"],
        "kernel": opts["kernel"],
        "vcpus": opts["vcpus"] or (AGENT_VCPUS if opts["agent"] else 2),
        "memory_mib": opts["memory"] or (AGENT_MEMORY_MIB if opts["agent"] else 1024),
        "disk_size": opts["disk_size"],
        "vmm": opts["vmm"],
        "start": start,
        "timeout": opts["timeout"],
        "net": opts["net"],
        "publish": list(opts["publish"]),
        "reverse": list(opts["reverse"]),
        "forward_ports": opts["forward_ports"],
        "ssh_keys": ssh_files.public_keys(tuple(opts["ssh_key"])),
        "cpu": opts["cpu"] or ("max" if opts["agent"] else None),
        "agent": opts["agent"],
        "provider": _provider() if opts["agent"] else None,
        "network_policy": network_policy_params(opts),
    }


def _provider() -> dict[str, Any] | None:
    from banger.cli.agent_env import provider_params

    return provider_params()


def create_options(fn: Any) -> Any:
    """The options `vm create` and `vm run` share."""
    for opt in reversed(
        [
            click.option("--image", default=None, help="Image name (default: config default_image)."),
            click.option("--kernel", default=None, help="Kernel name (default: config default_kernel)."),
            click.option("--vcpus", default=None, type=int, help="Virtual CPUs [default: 2]."),
            click.option(
                "--memory", default=None, type=int, help="MiB of guest RAM [default: 1024; 2048 with --agent]."
            ),
            click.option("--disk-size", default=None, help="Root disk size, e.g. 8G (default: the image's)."),
            click.option("--vmm", type=click.Choice(["auto", "qemu", "firecracker"]), default=None),
            click.option("--timeout", type=float, default=None, help="Seconds to wait for the guest agent."),
            click.option(
                "--net",
                type=click.Choice(["bridge", "none"]),
                default="bridge",
                show_default=True,
                help="bridge: a TAP on banger's bridge with NAT and DNS; none: no network.",
            ),
            click.option(
                "--publish",
                "-p",
                multiple=True,
                help="Publish a TCP port, [ADDR:]HOST:GUEST (ADDR defaults to 127.0.0.1; repeatable).",
            ),
            click.option(
                "--reverse", multiple=True, help="Guest 127.0.0.1:GUEST reaches host 127.0.0.1:HOST, GUEST:HOST."
            ),
            click.option(
                "--forward-ports",
                type=click.Choice(["auto", "off"]),
                default=None,
                help="Forward ports guest processes listen on to host 127.0.0.1 (default: config forward_ports).",
            ),
            click.option("--ssh-key", multiple=True, type=click.Path(), help="Also authorize this SSH public key."),
            click.option(
                "--cpu", default=None, metavar="MODEL", help="CPU model under QEMU TCG (default: config tcg_cpu)."
            ),
            click.option(
                "--agent",
                type=click.Choice(["opencode"]),
                default=None,
                help="An agent VM running this coding agent's server (2 vCPUs, 2048 MiB and cpu max by default).",
            ),
        ]
    ):
        fn = opt(fn)
    return network_policy_options(fn)


@vm.command()
@click.option("--name", default=None, help="VM name (default: a random adjective-noun).")
@create_options
@click.option("--no-start", is_flag=True, help="Only create it.")
@click.option("--workspace", "workspace_path", default=None, help="Copy this git checkout to /workspace/<name>.")
@click.option("--from-snapshot", default=None, metavar="SNAP", help="Resume a snapshot instead of booting an image.")
@json_option
def create(no_start: bool, from_snapshot: str | None, as_json: bool, workspace_path: str | None, **opts: Any) -> None:
    """Create a VM (and start it, unless --no-start)."""
    if from_snapshot is not None:
        from banger.cli.snapshot_cmds import create_from_snapshot

        if workspace_path is not None:
            raise InvalidInputError(
                "--workspace cannot be given with --from-snapshot (the snapshot's workspace comes along)"
            )

        create_from_snapshot(click.get_current_context(), from_snapshot, opts, start=not no_start, as_json=as_json)
        return
    params = _create_params(opts, start=not no_start)
    if workspace_path is None:
        _print_vm(rpc("vm.create", params, progress=not as_json), as_json, "created")
        return
    from banger.cli import workspace_cmds as wsc

    top = wsc.find_checkout(workspace_path)
    if no_start or top is None:
        raise InvalidInputError("--workspace needs a VM that starts (drop --no-start)")
    params["image"] = wsc.workspace_image(opts["image"], None)
    params["agent_start"] = False  # an agent starts in the workspace, so after the upload
    info = rpc("vm.create", params, progress=not as_json)
    info["workspace"] = wsc.upload(info["name"], top)
    if opts["agent"]:
        info["agent"] = _start_agent(info["name"], progress=not as_json)
    _print_vm(info, as_json, "created")


def _start_agent(vm_name: str, *, progress: bool) -> Any:
    """Start the coding agent of an agent VM created with agent_start=false; its description of the agent."""
    return rpc("vm.agent.start", {"name": vm_name, "provider": _provider()}, progress=progress)["agent"]


def _lifecycle(method: str, verb: str, doc: str, *, progress: bool = False, timeout_help: str | None = None) -> None:
    @vm.command(name=method.split(".")[1], help=doc)
    @click.argument("name")
    @json_option
    def cmd(name: str, as_json: bool, timeout: float | None = None) -> None:
        params: dict[str, Any] = {"name": name}
        if timeout is not None:
            params["timeout"] = timeout
        _print_vm(rpc(method, params, progress=progress and not as_json), as_json, verb)

    if timeout_help is not None:
        click.option("--timeout", type=float, default=None, help=timeout_help)(cmd)


_AGENT_WAIT = "Seconds to wait for the guest agent (default: config agent_timeout)."
_lifecycle(
    "vm.start", "started", "Start a VM; returns when its agent answers.", progress=True, timeout_help=_AGENT_WAIT
)
_lifecycle(
    "vm.stop", "stopped", "Shut a VM down cleanly (killed after a timeout).", timeout_help="Seconds before kill."
)
_lifecycle("vm.restart", "restarted", "Stop and start a VM.", progress=True, timeout_help=_AGENT_WAIT)
_lifecycle("vm.kill", "killed", "Kill a VM's VMM at once.")


@vm.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Kill running VMs first.")
def rm(names: tuple[str, ...], force: bool) -> None:
    """Remove VMs and every file of them."""
    failed = 0
    for name in names:  # one VM that cannot go does not keep the others
        try:
            rpc("vm.rm", {"name": name, "force": force})
        except BangerError as exc:
            click.echo(f"error: {name}: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), err=True)
            failed += 1
        else:
            click.echo(f"removed {name}")
    if failed:
        sys.exit(1)


@vm.command()
@click.argument("name")
@click.argument("new_name")
def rename(name: str, new_name: str) -> None:
    """Rename a VM; its DNS name changes at once."""
    rpc("vm.rename", {"name": name, "new_name": new_name})
    click.echo(f"renamed {name} -> {new_name}")


@vm.command()
@click.argument("name")
@click.argument("ports", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="Stop publishing these host ports.")
@json_option
def forward(name: str, ports: tuple[str, ...], remove: bool, as_json: bool) -> None:
    """Publish ports of a VM: `vm forward NAME [ADDR:]HOST:GUEST...` (served while it runs; kept until rm)."""
    rows = rpc("vm.forward", {"name": name, "specs": list(ports), "remove": remove})
    if as_json:
        emit_json(rows)
    else:
        table(
            rows,
            [("address", "ADDRESS"), ("host_port", "HOST"), ("guest_port", "GUEST"), ("proto", "PROTO")],
            empty="no published ports",
        )


@vm.command("ls")
@json_option
def ls(as_json: bool) -> None:
    """List VMs (also `vm list`)."""
    rows = rpc("vm.list")
    if as_json:
        emit_json(rows)
    else:
        # root sees every user's VMs, so the listing says whose each is
        columns = [*VM_COLUMNS, ("owner", "OWNER")] if os.geteuid() == 0 else VM_COLUMNS
        table(rows, columns, empty="no VMs (create one with `banger vm create`)")


@vm.command()
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Show one VM."""
    info = rpc("vm.show", {"name": name})
    if as_json:
        emit_json(info)
        return
    from banger.cli.fast import VM_SHOW_FIELDS

    kv([(k, info.get(k)) for k in VM_SHOW_FIELDS])


@vm.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new console output.")
@click.option("-n", "--lines", default=200, show_default=True)
def logs(name: str, follow: bool, lines: int) -> None:
    """Print the guest's console log."""
    if not follow:
        click.echo(rpc("vm.logs", {"name": name, "lines": lines})["text"])
        return
    _stream("vm.logs", {"name": name, "lines": lines, "follow": True}, stdin=False, tty=False)


@vm.command()
@click.argument("name")
def console(name: str) -> None:
    """Attach to the guest's serial console (a root shell); Ctrl-] detaches."""
    if sys.stdin.isatty():
        click.echo("attached to the serial console; Ctrl-] detaches", err=True)
    result = _stream("vm.console", {"name": name}, stdin=True, tty=sys.stdin.isatty(), detach=b"\x1d")
    if result.get("detached") and sys.stdin.isatty():
        click.echo("\r\ndetached", err=True)


def _stream(
    method: str,
    params: dict[str, Any],
    *,
    stdin: bool,
    tty: bool,
    detach: bytes | None = None,
    acked: bool = False,
) -> dict[str, Any]:
    from banger.cli.stream import stream_call

    client = connect(Paths.from_env())
    try:
        return stream_call(client, method, params, stdin=stdin, tty=tty, detach=detach, acked=acked)
    finally:
        client.close()


def _exit_code(result: dict[str, Any]) -> int:
    if result.get("signal"):
        return 128 + int(result["signal"])
    return int(result.get("exit_code") or 0)


def run_exec(
    name: str,
    argv: list[str],
    *,
    tty: bool,
    interactive: bool,
    env: dict[str, str],
    workdir: str | None,
    user: str | None,
) -> int:
    """Run argv in VM `name` with streamed stdio; returns the exit code to exit with."""
    from banger.cli.stream import terminal_size

    rows, cols = terminal_size(sys.stdin.fileno()) if tty else (24, 80)
    params = {
        "name": name,
        "argv": argv,
        "env": env,
        "cwd": workdir,
        "user": user,
        "tty": tty,
        "rows": rows,
        "cols": cols,
        "stdin": interactive,
        "ack_input": interactive,
    }
    return _exit_code(_stream("vm.exec", params, stdin=interactive, tty=tty, acked=interactive))


def open_shell(name: str, user: str | None) -> int:
    """An interactive login shell in VM `name` on a PTY; returns its exit code."""
    term = os.environ.get("TERM", "xterm-256color")
    return run_exec(name, LOGIN_SHELL, tty=True, interactive=True, env={"TERM": term}, workdir=None, user=user)


def _env_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"bad -e {pair!r}: use KEY=VALUE")
        env[key] = value
    return env


@vm.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-i", "--interactive", is_flag=True, help="Send stdin to the command.")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE for the command's environment.")
@click.option("-w", "--workdir", default=None, help="Working directory in the guest.")
@click.option("-u", "--user", default=None, help="User to run as in the guest.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(
    name: str,
    tty: bool,
    interactive: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
    command: tuple[str, ...],
) -> None:
    """Run a command in a VM: `banger vm exec NAME -- CMD...`; its exit code becomes banger's."""
    sys.exit(
        run_exec(
            name,
            list(command),
            tty=tty,
            interactive=interactive or tty,
            env=_env_pairs(env),
            workdir=workdir,
            user=user,
        )
    )


@vm.command()
@click.argument("name")
@click.option("-u", "--user", default=None, help="User to log in as.")
def shell(name: str, user: str | None) -> None:
    """Open an interactive shell in a VM (a PTY, with window resize)."""
    sys.exit(open_shell(name, user))


def _split_remote(arg: str) -> tuple[str | None, str]:
    name, sep, path = arg.partition(":")
    if sep and name and "/" not in name:
        return name, path
    return None, arg


@vm.command()
@click.argument("src")
@click.argument("dest")
def cp(src: str, dest: str) -> None:
    """Copy files or directories between host and VM: `vm cp ./f NAME:/path` or `vm cp NAME:/path ./f`."""
    sname, spath = _split_remote(src)
    dname, dpath = _split_remote(dest)
    if (sname is None) == (dname is None):
        raise InvalidInputError("exactly one of SRC and DEST must be NAME:PATH")
    if dname is not None:
        res = rpc("vm.cp", {"name": dname, "direction": "in", "src": os.path.abspath(spath), "dest": dpath})
    else:
        assert sname is not None
        res = rpc("vm.cp", {"name": sname, "direction": "out", "src": spath, "dest": os.path.abspath(dpath)})
    click.echo(f"copied {res['copied']} -> {res['to']}")


@vm.command()
@click.argument("name")
@json_option
def ports(name: str, as_json: bool) -> None:
    """List the guest's listening TCP/UDP ports and their processes."""
    rows = rpc("vm.ports", {"name": name})
    if as_json:
        emit_json(rows)
    else:
        table(
            rows,
            [
                ("proto", "PROTO"),
                ("address", "ADDRESS"),
                ("port", "PORT"),
                ("host_port", "HOST"),
                ("pid", "PID"),
                ("comm", "PROCESS"),
            ],
            empty="no listening ports",
        )


@vm.command(context_settings={"ignore_unknown_options": True})
@click.option("--name", default=None, help="VM name (default: random).")
@create_options
@click.option("--rm", "remove", is_flag=True, help="Remove the VM when the command or shell ends.")
@click.option("--workspace", "workspace_path", default=None, help="Git checkout to copy in (default: the one here).")
@click.option("--no-workspace", is_flag=True, help="No workspace, even inside a git checkout.")
@click.option("--no-tooling", is_flag=True, help="Do not install the checkout's tooling plan.")
@click.option("--prompt", default=None, help="With --agent: send this prompt, print the transcript, exit when idle.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(
    remove: bool,
    prompt: str | None,
    command: tuple[str, ...],
    workspace_path: str | None,
    no_workspace: bool,
    no_tooling: bool,
    **opts: Any,
) -> None:
    """Create and start a VM, then run COMMAND in it (or open a shell). Builds kernel and image if missing.

    Inside a git checkout (or with --workspace) the checkout is copied to /workspace/<name> first, its tooling
    installed, and with --rm the VM's changes come back as branch banger/NAME before it is removed."""
    from banger.cli import workspace_cmds as wsc
    from banger.cli.kernel_cmds import catalog_env

    if prompt is not None and not opts["agent"]:
        raise InvalidInputError("--prompt needs --agent")
    if no_workspace and workspace_path:
        raise InvalidInputError("--workspace and --no-workspace exclude each other")
    top = None if no_workspace else wsc.find_checkout(workspace_path)
    rpc("vm.prepare", {"image": opts["image"], "kernel": opts["kernel"], "catalog": catalog_env()}, progress=True)
    params = {**_create_params(opts, start=True), "rm_on_failure": remove}
    tooling_plan = None if top is None or no_tooling else wsc.plan_of(top)
    if top is not None:
        params["image"] = wsc.workspace_image(opts["image"], tooling_plan)
        params["agent_start"] = False  # an agent starts in the workspace, once it is in
    info = rpc("vm.create", params, progress=True)
    vm_name = info["name"]
    click.echo(f"started {vm_name}", err=True)
    code = 0
    uploaded = keep = False
    try:
        if top is not None:
            wsc.upload(vm_name, top)
            uploaded = True
            if tooling_plan is not None and tooling_plan.setup:
                wsc.run_setup(vm_name, tooling_plan.setup)
            if opts["agent"]:
                _start_agent(vm_name, progress=True)
        if prompt is not None:
            from banger.cli.session_cmds import prompt_and_wait

            session = rpc("session.start", {"vm": vm_name, "agent": opts["agent"]})["name"]
            code = prompt_and_wait({"vm": vm_name, "session": session, "text": prompt, "wait": True})
        elif command:
            code = run_exec(
                vm_name,
                list(command),
                tty=sys.stdin.isatty() and sys.stdout.isatty(),
                interactive=not sys.stdin.isatty() or sys.stdout.isatty(),
                env={},
                workdir=None,
                user=None,
            )
        else:
            code = open_shell(vm_name, None)
    finally:
        if remove:
            keep = uploaded and not wsc.export_before_rm(vm_name)
            if not keep:
                rpc("vm.rm", {"name": vm_name, "force": True})
                click.echo(f"removed {vm_name}", err=True)
    sys.exit(code or (1 if keep else 0))


vm.add_command(ls, name="list")  # the name people type first; `ls` stays the documented one


def _add_workspace_groups() -> None:
    from banger.cli.workspace_cmds import tooling, workspace

    vm.add_command(workspace)
    vm.add_command(tooling)


_add_workspace_groups()

tunnel_cmds.register(vm)


def _snapshot_commands() -> None:
    from banger.cli.snapshot_cmds import vm_clone, vm_snapshot

    vm.add_command(vm_snapshot)
    vm.add_command(vm_clone)


_snapshot_commands()
