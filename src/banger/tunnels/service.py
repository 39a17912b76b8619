"""The tunnel service: published ports, automatic forwards, reverse tunnels and SSH for every running VM.

It follows the VM service's lifecycle through its hooks (vms/hooks.py): when a VM runs (booted, or re-adopted by
a restarted daemon) its listeners and loops start (live.py); when it stops they end. It owns the `forwards` table
(publish.py) and `vm_tunnels` (settings.py); net/service.py only reads `forwards` to write DNAT rules.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from banger.config import Settings
from banger.errors import InvalidInputError, NotFoundError, UnsupportedError
from banger.guest.client import AgentClient
from banger.guest.tunnelclient import SshInfo, Tunnel, ssh_setup
from banger.net.service import NetworkService
from banger.store.db import Store
from banger.tunnels.live import LiveVm
from banger.tunnels.publish import Publish, PublishTable, check_bindable, parse_publish
from banger.tunnels.relay import HostConnector
from banger.tunnels.settings import ForwardMode, SettingsTable, VmTunnelSettings, check_public_key, parse_reverse
from banger.vms.agents import AgentEndpoint
from banger.vms.model import VmRecord, VmState
from banger.vms.service import VmService

log = logging.getLogger("banger.tunnels")

AGENT_WAIT = 30.0
GUEST_USER = "root"  # the user `vm shell` logs in as
REVERSE_READY_S = 10.0


class TunnelService:
    """Owns published ports and tunnel settings; see the module docstring."""

    def __init__(self, settings: Settings, store: Store, vms: VmService, network: NetworkService) -> None:
        self.settings = settings
        self.vms = vms
        self.network = network
        self.publishes = PublishTable(store)
        self.table = SettingsTable(store, ForwardMode.parse(str(settings.get("forward_ports"))))
        self.live: dict[str, LiveVm] = {}
        self._ssh: dict[str, asyncio.Task[SshInfo]] = {}
        vms.hooks.append(self)

    async def _client(self, vm_id: str) -> AgentClient:
        vm = self.vms.get(vm_id)
        if vm.state is not VmState.RUNNING or not vm.runtime:
            raise InvalidInputError(f"VM {vm.name} is {vm.state.value}, not running", hint=f"banger vm start {vm.name}")
        return await self.vms.agents.get(vm.id, AgentEndpoint.from_runtime(vm.runtime), AGENT_WAIT)

    def resolve(self, name: str) -> VmRecord:
        """A VM by name, also as NAME.<dns_domain> (what ssh passes as %h)."""
        suffix = "." + str(self.settings.get("dns_domain"))
        try:
            return self.vms.get(name)
        except NotFoundError:
            if name.endswith(suffix):
                return self.vms.get(name.removesuffix(suffix))
            raise

    def _live(self, vm: VmRecord) -> LiveVm:
        live = self.live.get(vm.id)
        if live is None:
            raise InvalidInputError(f"VM {vm.name} is {vm.state.value}, not running", hint=f"banger vm start {vm.name}")
        return live

    # -- at create -------------------------------------------------------------------------------------------

    def check_publish(self, specs: list[str], vm_id: str | None = None) -> list[Publish]:
        """Parse `--publish` specs and make sure each host port is free now (clear errors before anything is made)."""
        pubs = [parse_publish(s) for s in specs]
        hosts = [p.host_port for p in pubs]
        if len(set(hosts)) != len(hosts):
            raise InvalidInputError("a host port is published twice")
        mine = {p.host_port for p in self.publishes.of(vm_id)} if vm_id else set()
        for pub in pubs:
            owner = self.publishes.owner_of(pub.host_port)
            if owner is not None and pub.host_port not in mine:
                raise InvalidInputError(f"host port {pub.host_port} is already published by VM {owner}")
            live = self.live.get(vm_id or "")
            if pub.host_port not in mine and not (live and pub.host_port in live.published):
                check_bindable(pub)
        return pubs

    def configure(
        self,
        vm: VmRecord,
        *,
        publish: list[Publish],
        reverse: list[str],
        forward_ports: str | None,
        ssh_keys: list[str],
    ) -> None:
        """Record a new VM's tunnel settings (before its first start)."""
        mode = ForwardMode.parse(forward_ports) if forward_ports else self.table.default_mode
        rev = [parse_reverse(r) for r in reverse]
        keys = [check_public_key(k) for k in ssh_keys]
        self.table.put(vm.id, VmTunnelSettings(mode, rev, keys))
        self.publishes.replace(vm.id, publish)

    def validate(self, reverse: list[str], forward_ports: str | None, ssh_keys: list[str]) -> None:
        """Refuse bad options before a VM is created."""
        for r in reverse:
            parse_reverse(r)
        if forward_ports:
            ForwardMode.parse(forward_ports)
        for k in ssh_keys:
            check_public_key(k)

    # -- lifecycle hooks -------------------------------------------------------------------------------------

    async def vm_running(self, vm: VmRecord) -> None:
        """Listen for its published ports, start its reverse tunnels, port watch and SSH setup."""
        await self.vm_stopped(vm.id)
        live = LiveVm(vm.id, vm.name, lambda: self._client(vm.id))
        self.live[vm.id] = live
        cfg = self.table.get(vm.id)
        for pub in self.publishes.of(vm.id):
            try:
                await live.publish(pub)
            except Exception as exc:
                log.warning("vm %s: cannot listen for published port %s: %s", vm.name, pub, exc)
        self.network.refresh_forwards()
        waits = []
        for rev in cfg.reverse:
            live.skip.add(rev.guest_port)
            waits.append(live.start_tcp_reverse(rev.guest_port, rev.host_port))
        if waits:
            # A fresh boot's agent answers at once, so `vm create` returns with the guest side listening; a
            # re-adopted VM that does not answer must not hold up the daemon's start (its loops keep trying).
            done, _ = await asyncio.wait(waits, timeout=REVERSE_READY_S)
            for fut, rev in zip(waits, cfg.reverse, strict=True):
                if fut not in done or fut.exception() is not None:
                    problem = fut.exception() if fut in done else "not listening yet"
                    log.warning("vm %s: reverse tunnel %d:%d: %s", vm.name, rev.guest_port, rev.host_port, problem)
        if cfg.forward_ports is ForwardMode.AUTO:
            live.start_auto(lambda: {p.host_port for p in self.publishes.of(vm.id)})
        self._ssh[vm.id] = asyncio.create_task(self._ssh_setup(vm.id, cfg.ssh_keys))
        self._ssh[vm.id].add_done_callback(lambda t: t.cancelled() or t.exception())

    async def vm_stopped(self, vm_id: str) -> None:
        """Close everything the VM had open on the host side."""
        task = self._ssh.pop(vm_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        live = self.live.pop(vm_id, None)
        if live is not None:
            await live.close()

    async def close(self) -> None:
        """At daemon stop (VMs keep running; a restarted daemon listens again)."""
        for vm_id in list(self.live):
            await self.vm_stopped(vm_id)

    # -- operations ------------------------------------------------------------------------------------------

    async def open(self, name: str, port: int) -> Tunnel:
        """A tunnel to guest 127.0.0.1:port of a running VM (`vm.tunnel`, `vm proxy`)."""
        if not 1 <= port <= 65535:
            raise InvalidInputError(f"port {port} is not in 1-65535")
        return await self._live(self.resolve(name)).open(port)

    async def forward(self, name: str, specs: list[str], *, remove: bool) -> list[dict[str, Any]]:
        """Publish more ports of a VM (or stop publishing them); active at once if it runs."""
        vm = self.vms.get(name)
        async with self.vms.lock(vm.id):  # read-modify-write of the VM's ports: one caller at a time
            current = {p.host_port: p for p in self.publishes.of(vm.id)}
            live = self.live.get(vm.id)
            if remove:
                ports = [parse_publish(spec).host_port for spec in specs]
                for port in ports:
                    if port not in current:
                        raise NotFoundError(f"VM {vm.name} does not publish host port {port}")
                self.publishes.replace(vm.id, [p for p in current.values() if p.host_port not in ports])
                for port in ports:
                    if live is not None:
                        await live.unpublish(port)
            else:
                added = self.check_publish(specs, vm.id)
                started: list[int] = []
                try:
                    for pub in added:
                        if live is not None:
                            await live.publish(pub)
                            started.append(pub.host_port)
                    new_ports = {a.host_port for a in added}
                    kept = [p for p in current.values() if p.host_port not in new_ports]
                    self.publishes.replace(vm.id, sorted([*kept, *added], key=lambda p: p.host_port))
                except BaseException:
                    for port in started:
                        if live is not None:
                            await live.unpublish(port)
                    raise
            self.network.refresh_forwards()
            return self.published(vm.id)

    def published(self, vm_id: str) -> list[dict[str, Any]]:
        """`publish` of `vm show --json`."""
        return [p.to_json() for p in self.publishes.of(vm_id)]

    def auto_ports(self, vm_id: str) -> dict[int, int]:
        """guest port -> host port of the VM's active automatic forwards."""
        live = self.live.get(vm_id)
        return live.auto_ports() if live is not None else {}

    def skip_port(self, vm_id: str, guest_port: int) -> None:
        """Never forward this guest port automatically (banger's own servers in the guest, e.g. an agent's)."""
        live = self.live.get(vm_id)
        if live is not None:
            live.skip.add(guest_port)

    async def add_reverse(self, vm_id: str, guest_port: int, connector: HostConnector) -> None:
        """Guest 127.0.0.1:guest_port reaches whatever `connector` opens, while the VM runs (not persisted)."""
        live = self._live(self.vms.get(vm_id))
        live.skip.add(guest_port)
        await live.add_reverse(guest_port, connector)

    async def remove_reverse(self, vm_id: str, guest_port: int) -> None:
        """Undo add_reverse."""
        live = self.live.get(vm_id)
        if live is not None:
            await live.remove_reverse(guest_port)

    # -- SSH -------------------------------------------------------------------------------------------------

    async def _ssh_setup(self, vm_id: str, keys: list[str]) -> SshInfo:
        info = await ssh_setup(await self._client(vm_id), keys, GUEST_USER)
        cfg = self.table.get(vm_id)
        if info.sshd and not cfg.host_keys:
            cfg.host_keys = list(info.host_keys)  # pinned once, at the first report; never replaced afterwards
        elif info.sshd and set(info.host_keys) != set(cfg.host_keys):
            log.warning("vm %s: the guest reports SSH host keys other than the pinned ones; keeping the pins", vm_id)
        cfg.sshd = info.sshd
        self.table.put(vm_id, cfg)
        return info

    async def ssh(self, name: str, keys: list[str]) -> dict[str, Any]:
        """Authorize `keys` (the caller's) and return what an OpenSSH client needs to reach the VM."""
        vm = self.resolve(name)
        self._live(vm)  # running, or a clear error
        keys = [check_public_key(k) for k in keys]
        pending = self._ssh.get(vm.id)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        cfg = self.table.get(vm.id)
        new = [k for k in keys if k not in cfg.ssh_keys]
        if new or cfg.sshd is None:
            cfg.ssh_keys = [*cfg.ssh_keys, *new]
            self.table.put(vm.id, cfg)
            await self._ssh_setup(vm.id, cfg.ssh_keys)
            cfg = self.table.get(vm.id)
        if not cfg.sshd:
            raise UnsupportedError(
                f"VM {vm.name}'s image has no SSH server",
                hint="rebuild the image (`banger image build NAME --preset debian` includes openssh-server), "
                "or use `banger vm shell`",
            )
        return self.host_entry(vm, cfg)

    def host_entry(self, vm: VmRecord, cfg: VmTunnelSettings | None = None) -> dict[str, Any]:
        """Names and pinned host keys of one VM, for known_hosts."""
        cfg = cfg or self.table.get(vm.id)
        domain = str(self.settings.get("dns_domain"))
        return {"name": vm.name, "hosts": [f"{vm.name}.{domain}", vm.name], "host_keys": cfg.host_keys}

    def ssh_hosts(self) -> dict[str, Any]:
        """Every VM's pinned host keys, and what ssh-config needs."""
        return {
            "domain": str(self.settings.get("dns_domain")),
            "user": GUEST_USER,
            "hosts": [self.host_entry(vm) for vm in self.vms.all()],
        }
