"""vm.* methods: lifecycle, logs, exec, cp, ports; and host.doctor."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from banger.agents.provider import Provider
from banger.daemon.app import App
from banger.drivers import confine
from banger.errors import InvalidInputError
from banger.net.policy import NetPolicy
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext
from banger.vms import consolefollow, guestops
from banger.vms.model import VmRecord


def register(reg: MethodRegistry, app: App) -> None:
    vms = app.vms

    def describe(vm: VmRecord) -> dict[str, Any]:
        """A VM's public record, with its published ports as HOST:GUEST."""
        data = vm.to_json()
        data["publish"] = app.tunnels.published(vm.id)
        return data

    @reg.method("host.doctor")
    async def doctor(ctx: CallContext) -> dict[str, Any]:
        """What this host can run (KVM flavour, VMM binaries, vsock) and why."""
        caps = vms.caps()
        report = caps.to_dict()
        from banger.drivers import host

        try:
            report["selected_vmm"] = host.select_vmm("auto", caps).value
        except Exception as exc:
            report["selected_vmm"] = None
            report["selected_vmm_problem"] = str(exc)
        report["qemu_accel"] = host.qemu_accel(caps)
        report["confinement"] = confine.report(str(app.settings.get("firecracker_bin") or "firecracker"))
        return report

    @reg.method("vm.prepare")
    async def prepare(
        ctx: CallContext, kernel: str | None = None, image: str | None = None, catalog: str | None = None
    ) -> dict[str, Any]:
        """Make sure the kernel and image exist (pulling or building the defaults on a fresh host)."""
        from banger.vms.prepare import ensure_boot_artifacts

        default_kernel = str(app.settings.get("default_kernel"))
        default_image = str(app.settings.get("default_image"))
        return await ensure_boot_artifacts(
            app.kernels,
            app.images,
            kernel=kernel or default_kernel,
            image=image or default_image,
            default_kernel=default_kernel,
            default_image=default_image,
            catalog=catalog,
            progress=ctx.progress,
        )

    @reg.method("vm.create")
    async def create(
        ctx: CallContext,
        name: str | None = None,
        image: str | None = None,
        kernel: str | None = None,
        vcpus: int = 2,
        memory_mib: int = 1024,
        disk_size: str | None = None,
        vmm: str | None = None,
        start: bool = True,
        timeout: float | None = None,
        net: str = "bridge",
        publish: list[str] | None = None,
        rm_on_failure: bool = False,
        reverse: list[str] | None = None,
        forward_ports: str | None = None,
        ssh_keys: list[str] | None = None,
        cpu: str | None = None,
        agent: str | None = None,
        provider: dict[str, Any] | None = None,
        network_policy: dict[str, Any] | None = None,
        agent_start: bool = True,
    ) -> dict[str, Any]:
        """Create a VM (and start it unless start=false; rm_on_failure removes it if that start fails).

        agent="opencode": an agent VM booting a cached image that holds the agent, ready once the agent's server
        in it is healthy; with agent_start=false the server is left for `vm.agent.start` (after a workspace
        upload, so that it starts in the workspace).
        """
        if agent is not None and not start:
            raise InvalidInputError("--agent needs the VM started (drop --no-start)")
        model = Provider.from_params(provider) if agent is not None else None
        pubs = app.tunnels.check_publish(publish or [])  # a taken host port fails before anything is made
        app.tunnels.validate(reverse or [], forward_ports, ssh_keys or [])
        policy = NetPolicy.parse(network_policy)
        if agent is not None:
            base = image or str(app.settings.get("default_image"))
            image = await app.agent_vms.agent_image(app.images, base, agent, progress=ctx.progress)
        vm = await vms.create(
            name=name,
            image=image,
            kernel=kernel,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_size=disk_size,
            vmm=vmm,
            net=net,
            cpu=cpu,
            progress=ctx.progress,
        )
        app.owners.assign(vm.id, ctx.caller.uid)
        app.netpolicies.assign(vm.id, policy)
        try:
            app.tunnels.configure(
                vm, publish=pubs, reverse=reverse or [], forward_ports=forward_ports, ssh_keys=ssh_keys or []
            )
        except BaseException:
            await asyncio.shield(vms.remove(vm.id, force=True))
            raise
        if start:
            try:
                vm = await vms.start(vm.id, progress=ctx.progress, timeout=timeout)
                if agent is not None and not agent_start:
                    app.agent_vms.mark(vm.id, agent)
                    return {**describe(vm), "agent": {"agent": agent, "running": False}}
                if agent is not None:
                    setup = await app.agent_vms.setup(vm.id, agent, provider=model, progress=ctx.progress)
                    return {**describe(vm), "agent": setup}
            except BaseException:
                if rm_on_failure:  # `vm run --rm`: a VM that never ran leaves nothing behind either
                    await asyncio.shield(vms.remove(vm.id, force=True))
                raise
        return describe(vm)

    @reg.method("vm.start")
    async def start(
        ctx: CallContext, name: str, timeout: float | None = None, provider: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Boot a VM; returns when its agent answers (and, in an agent VM, its coding agent is healthy)."""
        vm = await vms.start(name, progress=ctx.progress, timeout=timeout)
        model = Provider.from_params(provider)
        return {**describe(vm), **await app.agent_vms.resume(vm.id, provider=model, progress=ctx.progress)}

    @reg.method("vm.agent.start")
    async def agent_start(ctx: CallContext, name: str, provider: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start (or restart) the coding agent's server of a running agent VM, in its workspace when it has one;
        returns once it is healthy."""
        vm = vms.get(name)
        agent = app.agent_vms.agent_of(vm)
        if agent is None:
            raise InvalidInputError(f"VM {vm.name} is not an agent VM", hint="create it with --agent opencode")
        model = Provider.from_params(provider)
        setup = await app.agent_vms.setup(vm.id, agent, provider=model, progress=ctx.progress)
        return {**describe(vms.get(vm.id)), "agent": setup}

    @reg.method("vm.stop")
    async def stop(ctx: CallContext, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """Shut a VM down cleanly (killed after timeout)."""
        return describe(await vms.stop(name, timeout=timeout))

    @reg.method("vm.restart")
    async def restart(
        ctx: CallContext, name: str, timeout: float | None = None, provider: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Stop then start a VM."""
        await vms.stop(name)
        vm = await vms.start(name, progress=ctx.progress, timeout=timeout)
        model = Provider.from_params(provider)
        return {**describe(vm), **await app.agent_vms.resume(vm.id, provider=model, progress=ctx.progress)}

    @reg.method("vm.kill")
    async def kill(ctx: CallContext, name: str) -> dict[str, Any]:
        """Kill a VM's VMM at once."""
        return describe(await vms.kill(name))

    @reg.method("vm.rename")
    async def rename(ctx: CallContext, name: str, new_name: str) -> dict[str, Any]:
        """Rename a VM (its <name>.vm DNS record follows)."""
        return describe(await vms.rename(name, new_name))

    @reg.method("vm.rm")
    async def rm(ctx: CallContext, name: str, force: bool = False) -> dict[str, Any]:
        """Remove a VM and all its files."""
        await vms.remove(name, force=force)
        return {"removed": name}

    @reg.method("vm.list")
    async def list_(ctx: CallContext) -> list[dict[str, Any]]:
        """All VMs."""
        return [describe(vm) for vm in vms.all()]

    @reg.method("vm.show")
    async def show(ctx: CallContext, name: str) -> dict[str, Any]:
        """One VM, with its files and runtime details."""
        vm = vms.get(name)
        data = describe(vm)
        data["dir"] = str(vms.vm_dir(vm.id))
        data["console_log"] = str(vms.vm_dir(vm.id) / "console.log")
        data["runtime"] = vm.runtime
        workspace = app.workspaces.get(vm.id)
        data["workspace"] = workspace.to_json() if workspace else None
        data["network_policy"] = app.netpolicies.get(vm.id).to_json()
        return data

    @reg.method("vm.logs")
    async def logs(ctx: CallContext, name: str, follow: bool = False, lines: int = 200) -> dict[str, Any]:
        """The guest console log; with follow, new output streams as events until cancelled."""
        vm = vms.get(name)
        path = vms.vm_dir(vm.id) / "console.log"
        text = vms.console_tail(vm.id, lines) if lines > 0 else ""
        if not follow:
            return {"text": text}
        ctx.event({"text": text + ("\n" if text else "")})

        async def emit(chunk: str) -> None:
            await ctx.send_event({"text": chunk})  # waits for the client: a slow reader slows only itself

        await consolefollow.follow(path, emit)

    @reg.method("vm.console")
    async def console(ctx: CallContext, name: str) -> dict[str, Any]:
        """Attach to the guest's serial console (a root shell on ttyS0); detaching cancels this call."""
        from banger.drivers.qemu import CONSOLE_SOCKET
        from banger.errors import UnsupportedError

        vm = vms.get(name)
        if vm.state.value != "running":
            raise InvalidInputError(f"VM {vm.name} is {vm.state.value}, not running")
        if vm.vmm != "qemu":
            raise UnsupportedError(
                f"an interactive console needs QEMU ({vm.name} runs on {vm.vmm})",
                hint=f"use `banger vm logs -f {vm.name}` or `banger vm shell {vm.name}`",
            )
        return await guestops.relay_console(vms.run_dir(vm.id) / CONSOLE_SOCKET, ctx.inbox, ctx.send_event)

    @reg.method("vm.exec")
    async def exec_(
        ctx: CallContext,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: bool = True,
        ack_input: bool = False,
    ) -> dict[str, Any]:
        """Run a command in the guest; stdio streams over `$/event` and `$/input` (stdin=false: no input).

        ack_input: an `{"ack": N}` event follows each stdin chunk once the guest's stream took its N bytes, so a
        client can keep a window of input in flight instead of flooding the daemon (which cancels a call holding
        more than 64 MiB of unread input)."""
        client = await guestops.agent_for(vms, name)
        return await guestops.exec_streaming(
            client,
            argv,
            env=env or {},
            cwd=cwd or app.workspaces.default_cwd(name),
            user=user,
            tty=tty,
            rows=rows,
            cols=cols,
            stdin=stdin,
            inbox=ctx.inbox,
            emit=ctx.send_event,
            ack_input=ack_input,
        )

    @reg.method("vm.cp")
    async def cp(ctx: CallContext, name: str, direction: str, src: str, dest: str) -> dict[str, Any]:
        """Copy files or directories into (direction=in) or out of (direction=out) a VM, modes kept."""
        client = await guestops.agent_for(vms, name)
        if direction == "in":
            if not Path(src).exists():
                raise InvalidInputError(f"{src} does not exist")
            where = await client.put(src, dest)
            return {"copied": src, "to": f"{name}:{where}"}
        if direction == "out":
            local = await guestops.copy_out(client, src, dest, ctx.peer_uid, ctx.peer_gid, vms.staging)
            return {"copied": f"{name}:{src}", "to": str(local)}
        raise InvalidInputError(f"direction must be 'in' or 'out', got {direction!r}")

    @reg.method("vm.ports")
    async def ports(ctx: CallContext, name: str) -> list[dict[str, Any]]:
        """Listening TCP and UDP ports in the guest, with their processes."""
        vm = vms.get(name)
        client = await guestops.agent_for(vms, name)
        auto = app.tunnels.auto_ports(vm.id)
        published = {p["guest_port"]: p["host_port"] for p in app.tunnels.published(vm.id)}
        return [
            {**p.to_json(), "host_port": auto.get(p.port, published.get(p.port)) if p.proto.startswith("tcp") else None}
            for p in await client.ports()
        ]
