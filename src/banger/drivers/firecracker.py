"""Firecracker driver: spawn `firecracker --api-sock`, configure it over its REST API, start, stop.

How the guest finds its devices: before 1.8, Firecracker announced each virtio-mmio device only through a
`virtio_mmio.device=<size>@<addr>:<irq>` entry appended to the kernel command line, which a kernel honours
only when built with VIRTIO_MMIO_CMDLINE_DEVICES. Since 1.8 (x86_64) it also describes them in an ACPI DSDT,
as QEMU's microvm does. Debian's cloud kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES, so under Firecracker it can
find its disks, network and vsock only through ACPI: it needs Firecracker >= 1.8, must not be booted with
`acpi=off`, and needs virtio_mmio (a module there) in its initrd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from banger.drivers import confine, fcjail, process
from banger.drivers.base import AgentTransport, SpawnHook, StopOutcome, VmmHandle, VmmKind, VmSpec
from banger.errors import InvalidInputError, ToolError

log = logging.getLogger("banger.drivers.firecracker")

API_SOCKET = "firecracker.sock"
VMM_LOG = "firecracker.log"  # the process's own stderr
API_LOG = "firecracker-api.log"  # what PUT /logger writes
METRICS = "firecracker-metrics.json"
API_TIMEOUT = 10.0
SOCKET_WAIT = 10.0


class FirecrackerApiError(ToolError):
    """Firecracker refused an API call; the message names the call and quotes its fault_message."""


class Resource:
    """One REST path of Firecracker's API."""

    def __init__(self, client: httpx.AsyncClient, path: str) -> None:
        self.client = client
        self.path = path

    async def put(self, body: dict[str, Any]) -> None:
        """PUT `body` here; a refusal becomes a FirecrackerApiError naming this path."""
        await self._send("PUT", body)

    async def patch(self, body: dict[str, Any]) -> None:
        """PATCH `body` here (a partial update, such as pausing the VM)."""
        await self._send("PATCH", body)

    async def get(self) -> dict[str, Any]:
        """GET this path's JSON."""
        data = await self._send("GET", None)
        return data if isinstance(data, dict) else {}

    async def _send(self, method: str, body: dict[str, Any] | None) -> Any:
        call = f"{method} {self.path}"
        if body is not None and "action_type" in body:
            call += f" {body['action_type']}"
        try:
            resp = await self.client.request(method, self.path, json=body, timeout=API_TIMEOUT)
        except httpx.HTTPError as exc:
            raise FirecrackerApiError(f"firecracker API {call} failed: {exc or type(exc).__name__}") from exc
        if resp.is_success:
            return resp.json() if resp.content else None
        try:
            fault = resp.json().get("fault_message") or resp.text
        except ValueError:
            fault = resp.text
        cls = InvalidInputError if resp.status_code == 400 else FirecrackerApiError
        raise cls(f"firecracker rejected {call}: {fault}", data={"status": resp.status_code, "call": call})


class FirecrackerApi:
    """Firecracker's REST API on its Unix socket, one resource object per path."""

    def __init__(self, api_socket: Path) -> None:
        transport = httpx.AsyncHTTPTransport(uds=os.fspath(api_socket))
        # Firecracker ignores the host; httpx needs one to build the request line.
        self.client = httpx.AsyncClient(transport=transport, base_url="http://localhost")
        self.instance = Resource(self.client, "/")
        self.machine_config = Resource(self.client, "/machine-config")
        self.boot_source = Resource(self.client, "/boot-source")
        self.logger = Resource(self.client, "/logger")
        self.metrics = Resource(self.client, "/metrics")
        self.vsock = Resource(self.client, "/vsock")
        self.actions = Resource(self.client, "/actions")
        self.vm_config = Resource(self.client, "/vm/config")
        self.vm = Resource(self.client, "/vm")
        self.snapshot_create = Resource(self.client, "/snapshot/create")
        self.snapshot_load = Resource(self.client, "/snapshot/load")

    def drive(self, drive_id: str) -> Resource:
        """The /drives/<id> resource."""
        return Resource(self.client, f"/drives/{drive_id}")

    def network_interface(self, iface_id: str) -> Resource:
        """The /network-interfaces/<id> resource."""
        return Resource(self.client, f"/network-interfaces/{iface_id}")

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()


def _instance_id(name: str) -> str:
    # Firecracker accepts only [A-Za-z0-9-], at most 64 characters, as --id.
    return (re.sub(r"[^A-Za-z0-9-]", "-", name) or "vm")[:64]


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no output)"
    return " | ".join(text[-lines:]) or "(no output)"


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Layout:
    """The paths Firecracker is given: the host's, or (jailed) the chroot's."""

    kernel: str
    initrd: str | None
    disks: tuple[str, ...]
    api_log: str
    metrics: str
    vsock: str | None

    @classmethod
    def direct(cls, spec: VmSpec) -> Layout:
        return cls(
            os.fspath(spec.kernel),
            os.fspath(spec.initrd) if spec.initrd is not None else None,
            tuple(os.fspath(d.path) for d in spec.disks),
            os.fspath(spec.run_dir / API_LOG),
            os.fspath(spec.run_dir / METRICS),
            os.fspath(spec.agent.socket) if spec.agent is not None and spec.agent.socket is not None else None,
        )


class FirecrackerDriver:
    """Runs guests under Firecracker; needs hardware KVM for the guest to actually execute."""

    kind = VmmKind.FIRECRACKER

    def __init__(self, binary: str) -> None:
        self.binary = binary

    async def launch(self, spec: VmSpec, on_spawn: SpawnHook | None = None) -> VmmHandle:
        """Spawn Firecracker (under its jailer when this host allows: see fcjail.py), configure the machine over
        the API and send InstanceStart."""
        agent = spec.agent
        if agent is not None and (agent.transport is not AgentTransport.VSOCK or agent.socket is None):
            raise InvalidInputError("firecracker's agent channel must be vsock with a Unix socket path")
        cleanup = [agent.socket] if agent is not None and agent.socket is not None else []
        jailer = fcjail.wanted(self.binary)
        jail: fcjail.Jail | None = None
        layout = Layout.direct(spec)
        with confine.spawn_lock():
            if jailer is None:
                api_socket = spec.run_dir / API_SOCKET
                argv = [self.binary, "--api-sock", os.fspath(api_socket), "--id", _instance_id(spec.name)]
                sockets = [api_socket, *(Path(f"{p}_65535") for p in cleanup)]
            else:
                # Jailed, the instance id is the run directory's name (the VM id): unique on the host (it names
                # the cgroups) and short (the chroot's socket paths must fit a Unix socket address).
                jail = fcjail.Jail(spec.run_dir, _instance_id(spec.run_dir.name), confine.free_uid())
                api_socket = jail.api_socket
                sockets = [api_socket, jail.root / f"{fcjail.JAIL_AGENT_SOCKET}_65535", *cleanup]
            # Guest-initiated vsock connections arrive on <uds>_<port>, so leave room for the suffix.
            process.check_socket_paths(*sockets)
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            if jail is not None and jailer is not None:
                jail.prepare()
                try:
                    layout = self._jailed_layout(jail, spec)
                except BaseException:
                    jail.remove()
                    raise
                argv = jail.argv(jailer, self.binary, spec)
            for stale in (api_socket, *cleanup):
                # Firecracker refuses to bind over a leftover socket from an earlier run.
                stale.unlink(missing_ok=True)
            if jail is not None and agent is not None and agent.socket is not None:
                fcjail.link_name(agent.socket.parent, agent.socket.name, jail.root / fcjail.JAIL_AGENT_SOCKET)
            # The guest's serial console is Firecracker's stdout, into banger's capped log writer.
            writer = process.console_writer(spec)
            spawn_error: BaseException | None = None
            pid = started = None
            try:
                pid = process.spawn(argv, log_file=spec.run_dir / VMM_LOG, stdout_file=writer.fd)
                started = process.start_time(pid)
                if jail is not None:
                    confine.hand_out(jail.uid, pid, started)
            except BaseException as exc:
                spawn_error = exc
                if jail is not None:
                    jail.remove()
            os.close(writer.fd)
        if spawn_error is not None or pid is None:
            # Waited for outside the lock: it is a thread lock, and QEMU spawns take it on this same event loop.
            await process.writer_gone(writer.pid)
            raise spawn_error or ToolError("firecracker did not start")
        handle = VmmHandle(self.kind, pid, started or -1, api_socket, spec.run_dir, tuple(cleanup))
        if on_spawn is not None and started is not None:
            on_spawn(handle)  # recorded before we wait on it: a daemon killed now must still find this VMM
        try:
            await self._wait_api(handle)
            async with _api(api_socket) as api:
                await self._configure(api, spec, layout)
                await api.actions.put({"action_type": "InstanceStart"})
        except BaseException:
            await self.kill(handle)
            await process.writer_gone(writer.pid)
            raise
        log.info("firecracker pid %d started for %s%s", pid, spec.name, f" (jailed, uid {jail.uid})" if jail else "")
        return handle

    @staticmethod
    def _jailed_layout(jail: fcjail.Jail, spec: VmSpec) -> Layout:
        """Bring the VM's files into the jail; the paths Firecracker is given are the chroot's."""
        kernel = jail.bring_in(spec.kernel, "vmlinux", private=False)
        initrd = jail.bring_in(spec.initrd, "initrd", private=False) if spec.initrd is not None else None
        disks = tuple(jail.bring_in(d.path, f"disk{i}", private=True) for i, d in enumerate(spec.disks))
        for name in (API_LOG, METRICS):  # written by the VMM in its chroot, read by banger under the usual names
            inner = jail.root / name
            inner.touch()
            os.chown(inner, jail.uid, jail.uid)
            fcjail.link_name(spec.run_dir, name, inner)
        if spec.net is not None:
            fcjail.give_tap(spec.net.tap, jail.uid)
        vsock = "/" + fcjail.JAIL_AGENT_SOCKET if spec.agent is not None and spec.agent.socket is not None else None
        return Layout(kernel, initrd, disks, "/" + API_LOG, "/" + METRICS, vsock)

    async def _wait_api(self, handle: VmmHandle) -> None:
        """Wait for Firecracker to bind its API socket, giving up as soon as the process dies."""
        # Firecracker binds the socket itself and has no fd-passing option, so this is a bounded retry
        # loop tied to the process's liveness rather than a blind sleep.
        async with process.deadline(SOCKET_WAIT, f"firecracker pid {handle.pid} opening its API socket"):
            while not _accepts(handle.control_socket):
                if not process.matches(handle):
                    raise ToolError(f"firecracker exited at start: {_log_tail(handle.run_dir / VMM_LOG)}")
                await asyncio.sleep(0.01)

    async def _configure(self, api: FirecrackerApi, spec: VmSpec, layout: Layout) -> None:
        # Logger first so that any later refusal is also explained in its log.
        for name in (API_LOG, METRICS):
            (spec.run_dir / name).touch()
        await api.logger.put({"log_path": layout.api_log, "level": "Info", "show_level": True})
        await api.metrics.put({"metrics_path": layout.metrics})
        await api.machine_config.put({"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib})
        boot: dict[str, Any] = {"kernel_image_path": layout.kernel, "boot_args": spec.cmdline}
        if layout.initrd is not None:
            boot["initrd_path"] = layout.initrd
        await api.boot_source.put(boot)
        for i, (disk, path) in enumerate(zip(spec.disks, layout.disks, strict=True)):
            drive_id = "rootfs" if i == 0 else f"disk{i}"
            await api.drive(drive_id).put(
                {
                    "drive_id": drive_id,
                    "path_on_host": path,
                    "is_root_device": False,  # the cmdline names root=; the initrd mounts it
                    "is_read_only": disk.read_only,
                }
            )
        if spec.net is not None:
            await api.network_interface("eth0").put(
                {"iface_id": "eth0", "host_dev_name": spec.net.tap, "guest_mac": spec.net.mac}
            )
        if spec.agent is not None and layout.vsock is not None:
            await api.vsock.put({"guest_cid": spec.agent.guest_cid, "uds_path": layout.vsock})

    def adopt(self, handle: VmmHandle) -> VmmHandle | None:
        """The handle if its Firecracker process (same pid and start time) still serves its API socket."""
        if handle.kind is not self.kind or not process.matches(handle) or not _accepts(handle.control_socket):
            return None
        return handle

    def is_alive(self, handle: VmmHandle) -> bool:
        """Whether this handle's Firecracker process still runs."""
        return process.matches(handle)

    async def stop(self, handle: VmmHandle, timeout: float) -> StopOutcome:
        """SendCtrlAltDel (the guest reboots, and Firecracker exits on reboot); kill after `timeout`."""

        async def ctrl_alt_del() -> None:
            async with _api(handle.control_socket) as api:
                await api.actions.put({"action_type": "SendCtrlAltDel"})

        try:
            return await process.stop_gracefully(handle, timeout, ctrl_alt_del, "Ctrl-Alt-Del")
        finally:
            if not process.matches(handle):
                fcjail.remove_jail_of(handle)

    async def kill(self, handle: VmmHandle) -> None:
        """Kill Firecracker and remove its sockets (and its jail)."""
        try:
            await process.kill(handle)
        finally:
            with contextlib.suppress(OSError):
                process.remove_sockets(handle)
            fcjail.remove_jail_of(handle)

    async def describe(self, handle: VmmHandle) -> dict[str, Any]:
        """GET / : Firecracker's instance info (id, state, vmm_version)."""
        async with _api(handle.control_socket) as api:
            return await api.instance.get()

    async def vm_config(self, handle: VmmHandle) -> dict[str, Any]:
        """GET /vm/config : the whole configuration Firecracker runs with."""
        async with _api(handle.control_socket) as api:
            return await api.vm_config.get()


@contextlib.asynccontextmanager
async def _api(api_socket: Path) -> AsyncIterator[FirecrackerApi]:
    """A FirecrackerApi client that is always closed."""
    api = FirecrackerApi(api_socket)
    try:
        yield api
    finally:
        await api.aclose()
