"""The VM service: create, start, stop, kill, remove, and look after VMM processes (also across restarts)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.aio import in_thread
from banger.config import Settings, is_cpu_model
from banger.drivers import host
from banger.drivers.base import (
    AgentChannel,
    AgentTransport,
    Disk,
    NetSpec,
    VmmDriver,
    VmmHandle,
    VmmKind,
    VmSpec,
)
from banger.drivers.firecracker import FirecrackerDriver
from banger.drivers.qemu import QemuDriver
from banger.errors import AlreadyExistsError, BangerError, InvalidInputError, NotFoundError
from banger.guest.protocol import DEFAULT_VSOCK_PORT
from banger.images.service import ImageService
from banger.images.spec import parse_size
from banger.kernels.manifest import INITRD, VMLINUX
from banger.kernels.service import KernelService
from banger.names import generate_name, validate_name
from banger.net.guestnet import GuestNet
from banger.net.service import NetworkService
from banger.progress import Progress, ProgressEvent, no_progress
from banger.store.db import Store
from banger.vms import consolefollow, exitreason, limits, records, sweep
from banger.vms.agents import AgentEndpoint, AgentPool
from banger.vms.cmdline import guest_cmdline
from banger.vms.disk import clone_root_disk
from banger.vms.hooks import VmHooks
from banger.vms.hostkeys import HostKeyPool
from banger.vms.model import LIVE_STATES, NetMode, VmRecord, VmState
from banger.vms.staging import StagingJournal
from banger.vms.stopping import stop_vmm

if TYPE_CHECKING:
    from banger.guest.seed import SeedMeta

log = logging.getLogger("banger.vms")

ROOT_DISK = "root.ext4"
SEED_DISK = "seed.ext4"
CONSOLE_LOG = "console.log"
AGENT_SOCKET = "agent.sock"
STOP_TIMEOUT = 20.0


class VmService:
    """Owns VM rows, VM directories and VMM processes."""

    def __init__(
        self, settings: Settings, store: Store, kernels: KernelService, images: ImageService, network: NetworkService
    ) -> None:
        self.network = network
        self.settings = settings
        self.store = store
        self.kernels = kernels
        self.images = images
        self.agents = AgentPool()
        self.host_keys = HostKeyPool()  # SSH host keys for clones, made ahead
        self.staging = StagingJournal(settings.paths.run_dir / "staging")  # copies out that a kill cut short
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._caps: host.HostCaps | None = None
        self.on_change: Callable[[str, VmRecord], None] = lambda _what, _vm: None  # the daemon's event bus
        self.hooks: list[VmHooks] = []
        # Called after every state change (sessions follow their VM); must not block.
        self.state_listeners: list[Callable[[VmRecord], None]] = []
        # Called after a VM is removed (the snapshot service drops a clone's implicit snapshot with its last clone).
        self.removed_hooks: list[Callable[[VmRecord], Awaitable[None]]] = []

    # -- records ---------------------------------------------------------------------------------------------

    def vm_dir(self, vm_id: str) -> Path:
        return self.settings.paths.vms / vm_id

    def run_dir(self, vm_id: str) -> Path:
        # Unix socket paths are limited to 108 bytes: keep the run dir short.
        return self.settings.paths.run_dir / vm_id

    def get(self, name: str) -> VmRecord:
        """A VM by name (or id), or NotFoundError."""
        row = self.store.one("SELECT * FROM vms WHERE name=? OR id=?", (name, name))
        if row is None:
            raise NotFoundError(f"no VM named {name!r}", hint="see `banger vm ls`")
        return VmRecord.from_row(row)

    def all(self) -> list[VmRecord]:
        return [VmRecord.from_row(r) for r in self.store.query("SELECT * FROM vms ORDER BY created_at, name")]

    def _set_state(self, vm: VmRecord, state: VmState, reason: str | None = None) -> None:
        vm.state, vm.reason = state, reason
        self.store.execute("UPDATE vms SET state=?, reason=? WHERE id=?", (state.value, reason, vm.id))
        log.info("vm %s: %s%s", vm.name, state.value, f" ({reason})" if reason else "")
        self.on_change("state", vm)
        for listener in self.state_listeners:
            listener(vm)

    def _set_runtime(self, vm: VmRecord, runtime: dict[str, Any] | None) -> None:
        vm.runtime = runtime
        self.store.execute(
            "UPDATE vms SET runtime=? WHERE id=?", (json.dumps(runtime) if runtime is not None else None, vm.id)
        )

    def lock(self, vm_id: str) -> asyncio.Lock:
        """Lifecycle operations on one VM run one at a time."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # -- drivers ---------------------------------------------------------------------------------------------

    async def load_caps(self) -> host.HostCaps:
        """Probe the host (VMM `--version` runs among other things) in a thread, off the event loop; cached."""
        if self._caps is None:
            self._caps = await in_thread(self._detect)
        return self._caps

    def caps(self) -> host.HostCaps:
        """The cached host probe (the daemon loads it at startup with `load_caps`)."""
        if self._caps is None:
            log.warning("host capabilities probed on the event loop (load_caps was not awaited first)")
            self._caps = self._detect()
        return self._caps

    def _detect(self) -> host.HostCaps:
        return host.detect(qemu_bin=self.settings.get("qemu_bin"), firecracker_bin=self.settings.get("firecracker_bin"))

    def driver(self, kind: VmmKind) -> VmmDriver:
        caps = self.caps()
        if kind is VmmKind.QEMU:
            return QemuDriver(caps.qemu.path or "qemu-system-x86_64", host.qemu_accel(caps))
        return FirecrackerDriver(caps.firecracker.path or "firecracker")

    # -- create ----------------------------------------------------------------------------------------------

    async def create(
        self,
        *,
        name: str | None,
        image: str | None,
        kernel: str | None,
        vcpus: int,
        memory_mib: int,
        disk_size: str | None,
        vmm: str | None,
        net: str = NetMode.BRIDGE,
        cpu: str | None = None,
        progress: Progress = no_progress,
    ) -> VmRecord:
        """Record a VM and clone its root disk; refuses up front what this host cannot run."""
        try:
            net_mode = NetMode(net)
        except ValueError:
            raise InvalidInputError(f"unknown network mode {net!r} (choose bridge or none)") from None
        if cpu is not None and not is_cpu_model(cpu):
            raise InvalidInputError(f"bad --cpu {cpu!r}: give a QEMU CPU model such as max or Haswell-v4")
        if net_mode is NetMode.BRIDGE:
            await self.network.setup()  # no-op once done; on a host without networking, the next line says why
            self.network.require()
        kind = host.select_vmm(vmm or str(self.settings.get("vmm")), self.caps())
        kernel_name = kernel or str(self.settings.get("default_kernel"))
        image_name = image or str(self.settings.get("default_image"))
        kinfo = self.kernels.get(kernel_name)
        if kind is VmmKind.FIRECRACKER and not (kinfo.get("boots_on") or {}).get("firecracker", False):
            raise InvalidInputError(f"kernel {kernel_name!r} has no ELF entry Firecracker can boot")
        iinfo = self.images.get(image_name)
        image_path = Path(iinfo["path"])
        disk_bytes = parse_size(disk_size) if disk_size else image_path.stat().st_size
        limits.check_request(vcpus=vcpus, memory_mib=memory_mib, disk_bytes=disk_bytes, vm_root=self.settings.paths.vms)
        taken = {r["name"] for r in self.store.query("SELECT name FROM vms")}
        if name is None:
            name = generate_name(taken)
        validate_name(name, "VM name")
        if name in taken:
            raise AlreadyExistsError(f"a VM named {name!r} already exists")
        vm = VmRecord(
            id=secrets.token_hex(6),
            name=name,
            state=VmState.CREATED,
            vmm=kind.value,
            kernel=kernel_name,
            image=image_name,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_bytes=disk_bytes,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            spec={"net": net_mode.value, **({"cpu": cpu} if cpu else {})},
        )
        vdir = self.vm_dir(vm.id)
        vdir.mkdir(parents=True)
        inserted = False
        try:
            progress(ProgressEvent(step=f"clone image {image_name}"))
            await in_thread(clone_root_disk, image_path, vdir / ROOT_DISK, disk_bytes)
            records.insert(self.store, vm)
            inserted = True
            if net_mode is NetMode.BRIDGE:
                vm.spec["ip"] = str(self.network.allocate(vm.id, vm.name))
                self.store.execute("UPDATE vms SET spec=? WHERE id=?", (json.dumps(vm.spec), vm.id))
        except BaseException as exc:
            # All or nothing: whatever failed (an integrity error included), the row, its lease and ports, and
            # its directory go. Only a row this call inserted is deleted (a clashing id belongs to another VM).
            if inserted:
                networked = self.network if net_mode is NetMode.BRIDGE else None
                await records.undo_insert(self.store, networked, vm.id)
            await in_thread(shutil.rmtree, vdir, ignore_errors=True)
            if isinstance(exc, sqlite3.IntegrityError):
                if "UNIQUE" in str(exc):
                    raise AlreadyExistsError(f"a VM named {name!r} already exists") from exc
                raise NotFoundError(f"kernel {kernel_name!r} or image {image_name!r} was removed meanwhile") from exc
            raise
        log.info("vm %s created (%s, kernel %s, image %s)", vm.name, vm.vmm, vm.kernel, vm.image)
        self.on_change("created", vm)
        return vm

    # -- start -----------------------------------------------------------------------------------------------

    async def start(self, name: str, *, progress: Progress = no_progress, timeout: float | None = None) -> VmRecord:
        """Boot a VM and return once its agent answers; on failure the VM is in state error with the reason."""
        vm = self.get(name)
        async with self.lock(vm.id):
            vm = self.get(vm.id)
            if vm.state in LIVE_STATES:
                if vm.state is VmState.RUNNING:
                    return vm
                raise InvalidInputError(f"VM {vm.name} is {vm.state.value}")
            if vm.spec.get("restore"):  # made from a snapshot and never started: resume it
                from banger.vms.restore import restore_boot

                return await restore_boot(self, vm, progress, timeout or float(self.settings.get("agent_timeout")))
            return await self._boot(vm, progress, timeout or float(self.settings.get("agent_timeout")))

    def _spec(self, vm: VmRecord) -> VmSpec:
        manifest = self.kernels.boot_files(vm.kernel)
        kdir = Path(self.kernels.get(vm.kernel)["path"])
        vdir, rdir = self.vm_dir(vm.id), self.run_dir(vm.id)
        kind = VmmKind(vm.vmm)
        if kind is VmmKind.QEMU:
            agent = AgentChannel(AgentTransport.VIRTIO_SERIAL, socket=rdir / AGENT_SOCKET)
        else:
            agent = AgentChannel(AgentTransport.VSOCK, socket=rdir / AGENT_SOCKET, guest_cid=3)
        return VmSpec(
            name=vm.name,
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            kernel=kdir / VMLINUX,
            initrd=kdir / INITRD if (kdir / INITRD).is_file() else None,
            cmdline=guest_cmdline(manifest.cmdline),
            console_log=vdir / CONSOLE_LOG,
            console_log_max_bytes=int(self.settings.get("console_log_max_mib")) << 20,
            run_dir=rdir,
            disks=(self._root_disk(vm), Disk(vdir / SEED_DISK, read_only=True)),
            agent=agent,
            cpu_model=str(vm.spec.get("cpu") or self.settings.get("tcg_cpu")),
        )

    def _root_disk(self, vm: VmRecord) -> Disk:
        if vm.spec.get("root_format") == "qcow2":  # a clone's overlay on its snapshot's disk
            return Disk(self.vm_dir(vm.id) / "root.qcow2", format="qcow2")
        return Disk(self.vm_dir(vm.id) / ROOT_DISK)

    def _seed_meta(self, vm: VmRecord, gnet: GuestNet | None) -> SeedMeta:
        from banger.guest.seed import HaltAction, NetInterface, Network, SeedMeta

        network = None
        if gnet is not None:
            iface = NetInterface(
                name="eth0",
                mac=gnet.guest_mac,
                address=str(gnet.ip),
                prefix=gnet.prefix,
                gateway=str(gnet.gateway),
                mtu=gnet.mtu,
            )
            network = Network(
                interfaces=(iface,), nameservers=tuple(str(n) for n in gnet.nameservers), search=gnet.search
            )
        # Firecracker exits only when its guest reboots; QEMU (run with -no-reboot) on either.
        halt = HaltAction.REBOOT if vm.vmm == VmmKind.FIRECRACKER else HaltAction.POWEROFF
        return SeedMeta(hostname=vm.name, vm_name=vm.name, network=network, halt=halt)

    async def _boot(self, vm: VmRecord, progress: Progress, timeout: float) -> VmRecord:
        self._set_state(vm, VmState.STARTING)
        driver = self.driver(VmmKind(vm.vmm))
        handle: VmmHandle | None = None
        gnet: GuestNet | None = None
        console = self.vm_dir(vm.id) / CONSOLE_LOG
        # The console log spans boots: an error must quote this boot's lines only.
        console_start = console.stat().st_size if console.exists() else 0
        try:
            spec = self._spec(vm)
            if vm.spec.get("net") == NetMode.BRIDGE:
                await self.network.setup()
                gnet = await self.network.plug(vm.id)
                spec = dataclasses.replace(spec, net=NetSpec(gnet.tap, gnet.guest_mac))
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            progress(ProgressEvent(step="write seed drive"))
            from banger.guest.seed import build_seed

            await in_thread(build_seed, self.vm_dir(vm.id) / SEED_DISK, self._seed_meta(vm, gnet))
            progress(ProgressEvent(step=f"launch {vm.vmm}"))
            assert spec.agent is not None and spec.agent.socket is not None
            runtime: dict[str, Any] = {"agent_socket": str(spec.agent.socket)}
            if spec.agent.transport is AgentTransport.VSOCK:
                runtime["agent_vsock_port"] = DEFAULT_VSOCK_PORT

            def record(spawned: VmmHandle) -> None:
                self._set_runtime(vm, {**runtime, "handle": spawned.to_dict()})

            handle = await driver.launch(spec, on_spawn=record)
            record(handle)
            self._watch(vm.id, driver, handle)
            progress(ProgressEvent(step="wait for guest agent"))
            await self.agents.get(vm.id, AgentEndpoint.from_runtime(runtime), timeout)
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, BangerError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, asyncio.CancelledError):
                reason = "start was cancelled"
            tail = self.console_tail(vm.id, since=console_start)
            try:
                if handle is not None:
                    self._unwatch(vm.id)
                    await driver.kill(handle)
                await self.agents.drop(vm.id)
                if gnet is not None:
                    await self.network.unplug(vm.id)
            except Exception as cleanup_exc:  # the original error matters more; say what cleanup could not do
                log.error("vm %s: cleanup after a failed start failed: %s", vm.name, cleanup_exc)
                reason += f" (and cleanup failed: {cleanup_exc})"
            finally:
                if handle is None or not driver.is_alive(handle):
                    self._set_runtime(vm, None)
                self._set_state(vm, VmState.ERROR, reason)
            if isinstance(exc, BangerError):
                raise BangerError(
                    f"VM {vm.name} failed to start: {reason}", data={"console_tail": tail}, hint=_tail_hint(tail)
                ) from exc
            raise
        self._set_state(vm, VmState.RUNNING)
        await self._notify(vm.id, running=True)
        return self.get(vm.id)

    async def _notify(self, vm_id: str, *, running: bool) -> None:
        for hook in self.hooks:
            try:
                await (hook.vm_running(self.get(vm_id)) if running else hook.vm_stopped(vm_id))
            except Exception as exc:
                log.warning("vm %s: %s hook failed: %s", vm_id, "running" if running else "stopped", exc)

    def console_tail(self, vm_id: str, lines: int = 15, since: int = 0) -> str:
        """The last lines the guest printed on its console (from byte offset `since` on)."""
        return consolefollow.tail(self.vm_dir(vm_id) / CONSOLE_LOG, lines, since)

    # -- watch -----------------------------------------------------------------------------------------------

    def _watch(self, vm_id: str, driver: VmmDriver, handle: VmmHandle) -> None:
        """Notice a VMM that exits without being asked to (killed behind our back, guest crash)."""
        self._unwatch(vm_id)
        self._watchers[vm_id] = asyncio.create_task(self._watch_task(vm_id, driver, handle), name=f"watch:{vm_id}")

    def _unwatch(self, vm_id: str) -> None:
        task = self._watchers.pop(vm_id, None)
        if task is not None:
            task.cancel()

    async def _watch_task(self, vm_id: str, driver: VmmDriver, handle: VmmHandle) -> None:
        from banger.drivers import process

        while not await process.wait_exit(handle, 3600):
            pass
        self._watchers.pop(vm_id, None)
        async with self.lock(vm_id):
            try:
                vm = self.get(vm_id)
            except NotFoundError:
                return
            if vm.state in LIVE_STATES:
                await self._notify(vm_id, running=False)
                await self.agents.drop(vm_id)
                await driver.kill(handle)  # removes its sockets
                await self._unplug(vm)
                self._set_runtime(vm, None)
                reason = await exitreason.unexpected_exit(self.vm_dir(vm_id) / CONSOLE_LOG)
                self._set_state(vm, VmState.ERROR, reason)

    # -- stop / kill / rm ------------------------------------------------------------------------------------

    def _handle(self, vm: VmRecord) -> VmmHandle | None:
        data = (vm.runtime or {}).get("handle")
        return VmmHandle.from_dict(data) if data else None

    async def stop(self, name: str, *, timeout: float = STOP_TIMEOUT) -> VmRecord:
        """Shut the guest down cleanly (agent poweroff, then the VMM's own way), killing it after `timeout`."""
        vm = self.get(name)
        async with self.lock(vm.id):
            vm = self.get(vm.id)
            handle = self._handle(vm)
            if handle is None or vm.state not in LIVE_STATES:
                return vm
            self._set_state(vm, VmState.STOPPING)
            self._unwatch(vm.id)
            await self._notify(vm.id, running=False)
            driver = self.driver(VmmKind(vm.vmm))
            endpoint = AgentEndpoint.from_runtime(vm.runtime or {})
            try:
                await stop_vmm(driver, handle, self.agents, vm.id, endpoint, timeout)
            except BaseException as exc:
                # Not left "stopping" forever: say what happened, and keep watching a VMM that survived.
                self._set_state(vm, VmState.ERROR, f"stop failed: {exc}")
                if driver.is_alive(handle):
                    self._watch(vm.id, driver, handle)
                raise
            await self.agents.drop(vm.id)
            await self._unplug(vm)
            self._set_runtime(vm, None)
            self._set_state(vm, VmState.STOPPED)
            return vm

    async def kill(self, name: str) -> VmRecord:
        """Kill the VMM at once."""
        vm = self.get(name)
        async with self.lock(vm.id):
            vm = self.get(vm.id)
            await self._kill_locked(vm)
            return vm

    async def _kill_locked(self, vm: VmRecord) -> None:
        handle = self._handle(vm)
        self._unwatch(vm.id)
        await self._notify(vm.id, running=False)
        await self.agents.drop(vm.id)
        try:
            if handle is not None:
                await self.driver(VmmKind(vm.vmm)).kill(handle)
            await self._unplug(vm)
        finally:
            self._set_runtime(vm, None)
            if vm.state is not VmState.CREATED:
                self._set_state(vm, VmState.STOPPED)

    async def remove(self, name: str, *, force: bool) -> None:
        """Delete a VM and every file of it; a running VM needs `force` (it is killed)."""
        vm = self.get(name)
        async with self.lock(vm.id):
            # Checked under the lock: a start queued behind us must not boot a VM we are deleting.
            vm = self.get(vm.id)
            if vm.state in LIVE_STATES or vm.runtime:
                if not force:
                    raise InvalidInputError(f"VM {vm.name} is {vm.state.value}", hint="stop it first, or use rm -f")
                await self._kill_locked(vm)
            if vm.spec.get("net") == NetMode.BRIDGE:
                await self.network.release(vm.id)
            # The record goes first: a daemon killed from here on leaves only files without a record, which the
            # next start sweeps (sweep.remove_orphans); the other order left a VM whose files were gone.
            self.store.execute("DELETE FROM vms WHERE id=?", (vm.id,))
            await in_thread(shutil.rmtree, self.vm_dir(vm.id), ignore_errors=True)
            await in_thread(shutil.rmtree, self.run_dir(vm.id), ignore_errors=True)
        self._locks.pop(vm.id, None)
        log.info("vm %s removed", vm.name)
        self.on_change("removed", vm)
        for hook in self.removed_hooks:
            await hook(vm)

    async def rename(self, name: str, new_name: str) -> VmRecord:
        """Give a VM a new name; its DNS name follows at once."""
        vm = self.get(name)
        validate_name(new_name, "VM name")
        async with self.lock(vm.id):
            if self.store.one("SELECT 1 FROM vms WHERE name=?", (new_name,)) is not None:
                raise AlreadyExistsError(f"a VM named {new_name!r} already exists")
            self.store.execute("UPDATE vms SET name=? WHERE id=?", (new_name, vm.id))
            if vm.spec.get("net") == NetMode.BRIDGE:
                self.network.rename(vm.id, new_name)
        log.info("vm %s renamed to %s", vm.name, new_name)
        self.on_change("renamed", self.get(vm.id))
        return self.get(vm.id)

    # -- daemon lifecycle ------------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """At daemon start: re-adopt VMMs that kept running, and record the ones that died meanwhile."""
        await self.load_caps()
        vms = self.all()
        sweep.remove_orphans((self.settings.paths.vms, self.settings.paths.run_dir), {vm.id for vm in vms})
        self.staging.sweep()
        sweep.remove_stale_temps(self.vm_dir(vm.id) for vm in vms)
        if any(vm.spec.get("net") == NetMode.BRIDGE for vm in vms):
            # Networking is set up lazily (never on a host that has no networked VM), but once VMs use it, the
            # bridge, table and DNS must come back with the daemon.
            await self.network.setup()
        running: set[str] = set()
        for vm in vms:
            if vm.state not in LIVE_STATES:
                continue
            handle = self._handle(vm)
            driver = self.driver(VmmKind(vm.vmm))
            adopted = driver.adopt(handle) if handle is not None else None
            if adopted is None:
                if handle is not None:
                    await driver.kill(handle)  # only removes leftovers: the process is gone
                killed = await self._kill_unrecorded(vm)
                reason = _reconcile_reason(vm.state, killed)
                self._set_runtime(vm, None)
                self._set_state(vm, VmState.ERROR, reason)
                continue
            log.info("vm %s: re-adopted %s pid %d", vm.name, vm.vmm, adopted.pid)
            running.add(vm.id)
            if vm.state is not VmState.RUNNING:
                self._set_state(vm, VmState.RUNNING)
            self._watch(vm.id, driver, adopted)
        if self.network.available:
            await self.network.reconcile(running)
        for vm_id in sorted(running):
            await self._notify(vm_id, running=True)

    async def _kill_unrecorded(self, vm: VmRecord) -> bool:
        """Kill a VMM of `vm` that runs without a record (the daemon died between spawning it and saving its pid).

        Such a process (QEMU or Firecracker) is found by the tag `spawn` put in its environment, never by its
        command line; left alone it would hold the disk forever.
        """
        from banger.drivers import process

        pids = await in_thread(process.tagged_pids, self.run_dir(vm.id))
        for pid in pids:
            started = process.start_time(pid)
            if started is None:
                continue
            log.warning("vm %s: killing unrecorded %s pid %d", vm.name, vm.vmm, pid)
            orphan = VmmHandle(VmmKind(vm.vmm), pid, started, self.run_dir(vm.id) / "none", self.run_dir(vm.id))
            await process.kill(orphan)
        return bool(pids)

    async def _unplug(self, vm: VmRecord) -> None:
        if vm.spec.get("net") == NetMode.BRIDGE:
            try:
                await self.network.unplug(vm.id)
            except BangerError as exc:
                log.warning("vm %s: could not remove its TAP: %s", vm.name, exc)

    async def close(self) -> None:
        """At daemon stop: VMs keep running; only our watchers and agent connections end."""
        for vm_id in list(self._watchers):
            self._unwatch(vm_id)
        await self.agents.close_all()
        await self.host_keys.close()
        await self.network.shutdown()


def _reconcile_reason(state: VmState, killed: bool) -> str:
    """Why a VM found dead at daemon start is in error: one wording per situation, whatever the timing."""
    if state is VmState.STARTING:
        # Whether the VMM died with the daemon or had to be stopped, the start did not finish: say so.
        return "the daemon stopped while this VM was starting; " + (
            "its VMM was stopped" if killed else "its VMM is gone"
        )
    if killed:
        return "the VMM ran without a record while the daemon was not running; it was stopped"
    return "the VMM process exited while the daemon was not running"


def _tail_hint(tail: str) -> str | None:
    if not tail:
        return None
    return "guest console (last lines):\n" + tail
