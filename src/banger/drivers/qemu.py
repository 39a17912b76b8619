"""QEMU `-M microvm` driver: virtio-mmio devices, controlled over QMP (qemu.qmp) on a socket we create."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from banger.drivers import confine, consolelog, process, qemu_migrate, qmpconnect
from banger.drivers.base import AGENT_PORT_NAME, AgentTransport, SpawnHook, StopOutcome, VmmHandle, VmmKind, VmSpec
from banger.drivers.host import DEV_VHOST_VSOCK, host_tsc_khz
from banger.errors import InvalidInputError, ToolError, UnsupportedError

log = logging.getLogger("banger.drivers.qemu")

QMP_SOCKET = "qmp.sock"
TCG_TB_SIZE_MIB = 128
# The serial console, served to `banger vm console` (see argv()).
CONSOLE_SOCKET = "console.sock"
VMM_LOG = "qemu.log"
QMP_CONNECT_TIMEOUT = 60.0


def _opt(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's key=value,key=value option syntax (a comma is doubled)."""
    return os.fspath(value).replace(",", ",,")


def _listen(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, created by us so it exists before QEMU does anything."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise ToolError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no output)"
    return " | ".join(text[-lines:]) or "(no output)"


class QemuDriver:
    """Runs guests under qemu-system-x86_64's microvm machine, with KVM or TCG."""

    kind = VmmKind.QEMU

    def __init__(self, binary: str, accel: str) -> None:
        if accel not in ("kvm", "tcg"):
            raise InvalidInputError(f"unknown QEMU accelerator {accel!r}")
        self.binary = binary
        self.accel = accel

    def cmdline(self, spec: VmSpec) -> str:
        """The guest kernel command line as passed, plus what this accelerator needs."""
        line = spec.cmdline
        if self.accel == "tcg" and "tsc_early_khz=" not in line:
            # Without a TSC frequency the kernel calibrates against emulated timers and about one
            # boot in fifteen hangs under TCG.
            khz = host_tsc_khz()
            if khz:
                line = f"{line} tsc_early_khz={khz}"
        return line

    def argv(
        self,
        spec: VmSpec,
        qmp_fd: int,
        agent_fd: int | None,
        console_fd: int | None = None,
        console_log_fd: int | None = None,
    ) -> list[str]:
        """The full QEMU command line for `spec`, given the fds of the sockets (and console log pipe) we created."""
        # microvm keeps ACPI on by default: Debian's cloud kernel finds virtio-mmio devices only through it.
        # Under TCG, cap the translation cache (QEMU's default reserves 1 GiB, and it fills as the guest runs):
        # it is most of the host memory a TCG guest costs beyond its own RAM.
        accel = f"tcg,tb-size={TCG_TB_SIZE_MIB}" if self.accel == "tcg" else self.accel
        args = [self.binary, "-M", "microvm", "-accel", accel, "-name", _opt(spec.name)]
        if self.accel == "kvm":
            args += ["-cpu", "host"]
        elif spec.cpu_model:
            args += ["-cpu", spec.cpu_model]
        args += ["-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M"]
        args += qemu_migrate.memory_args(spec)
        # -no-reboot: a guest reboot ends the VMM, as under Firecracker; the daemon decides what happens next.
        args += ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
        args += ["-kernel", os.fspath(spec.kernel), "-append", self.cmdline(spec)]
        if spec.initrd is not None:
            args += ["-initrd", os.fspath(spec.initrd)]
        # The log goes through banger's capped writer (consolelog.py) when we were given its pipe.
        log_path = f"/dev/fd/{console_log_fd}" if console_log_fd is not None else _opt(spec.console_log)
        if console_fd is None:
            args += ["-chardev", f"file,id=console,path={log_path},append=on"]
        else:
            # An interactive serial console (`banger vm console`) whose output is also logged, client or not.
            log_opt = f"logfile={log_path},logappend=on"
            args += ["-chardev", f"socket,id=console,fd={console_fd},server=on,wait=off,{log_opt}"]
        args += ["-serial", "chardev:console"]
        args += ["-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
        # Guests block early on getrandom() without an entropy source under TCG.
        args += ["-device", "virtio-rng-device"]
        for i, disk in enumerate(spec.disks):
            ro = "on" if disk.read_only else "off"
            args += ["-drive", f"id=disk{i},file={_opt(disk.path)},format={disk.format},if=none,readonly={ro}"]
            args += ["-device", f"virtio-blk-device,drive=disk{i}"]
        if spec.net is not None:
            args += ["-netdev", f"tap,id=net0,ifname={_opt(spec.net.tap)},script=no,downscript=no"]
            args += ["-device", f"virtio-net-device,netdev=net0,mac={spec.net.mac}"]
        if spec.agent is not None:
            if spec.agent.transport is AgentTransport.VIRTIO_SERIAL:
                args += ["-device", "virtio-serial-device"]
                args += ["-chardev", f"socket,id=agent,fd={agent_fd},server=on,wait=off"]
                args += ["-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}"]
            else:
                args += ["-device", f"vhost-vsock-device,guest-cid={spec.agent.guest_cid}"]
        return args

    async def launch(self, spec: VmSpec, on_spawn: SpawnHook | None = None) -> VmmHandle:
        """Start QEMU and wait until QMP answers and reports the guest running."""
        if spec.agent is not None and spec.agent.transport is AgentTransport.VSOCK and not DEV_VHOST_VSOCK.exists():
            raise UnsupportedError(
                f"a vsock agent channel under QEMU needs {DEV_VHOST_VSOCK}",
                hint="modprobe vhost_vsock, or use virtio-serial",
            )
        qmp_path = spec.run_dir / QMP_SOCKET
        console_path = spec.run_dir / CONSOLE_SOCKET
        agent_socket = spec.agent.socket if spec.agent is not None else None
        process.check_socket_paths(qmp_path, console_path, *([agent_socket] if agent_socket else []))
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        cleanup: list[Path] = []
        writer: consolelog.Writer | None = None
        try:
            with contextlib.ExitStack() as fds:
                qmp_sock = fds.enter_context(_listen(qmp_path))
                cleanup.append(console_path)
                console_fd = fds.enter_context(_listen(console_path)).fileno()
                agent_fd: int | None = None
                if spec.agent is not None and spec.agent.transport is AgentTransport.VIRTIO_SERIAL and agent_socket:
                    cleanup.append(agent_socket)
                    agent_fd = fds.enter_context(_listen(agent_socket)).fileno()
                writer = process.console_writer(spec)
                fds.callback(os.close, writer.fd)
                argv = self.argv(spec, qmp_sock.fileno(), agent_fd, console_fd, writer.fd)
                pass_fds = [qmp_sock.fileno(), console_fd, writer.fd] + ([agent_fd] if agent_fd is not None else [])
                pid = confine.spawn_qemu(argv, pass_fds, spec, log_file=spec.run_dir / VMM_LOG)
        except BaseException:
            for path in (qmp_path, *cleanup):
                path.unlink(missing_ok=True)
            if writer is not None:
                await process.writer_gone(writer.pid)
            raise
        # Our copies of the listening sockets are closed; QEMU holds its own.
        started = process.start_time(pid)
        handle = VmmHandle(self.kind, pid, started or -1, qmp_path, spec.run_dir, tuple(cleanup))
        if on_spawn is not None and started is not None:
            on_spawn(handle)  # recorded before we wait on it: a daemon killed now must still find this VMM
        try:
            if started is None:
                raise ToolError(f"qemu exited at once: {_log_tail(spec.run_dir / VMM_LOG)}")
            if spec.restore is not None:
                await qemu_migrate.load_state(handle, spec.restore)  # the guest stays paused: see RestoreFrom
            elif not (status := await self.qmp(handle, "query-status", timeout=QMP_CONNECT_TIMEOUT)).get("running"):
                raise ToolError(f"qemu started but the guest is {status.get('status')!r}, not running")
        except BaseException:
            await self.kill(handle)
            await process.writer_gone(writer.pid)
            raise
        log.info("qemu pid %d started for %s (accel %s)", pid, spec.name, self.accel)
        return handle

    async def qmp(
        self, handle: VmmHandle, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 10.0
    ) -> Any:
        """Run one QMP command on a fresh connection (QEMU serves one QMP client at a time); return its result."""
        client: QMPClient | None = None
        try:
            async with process.deadline(timeout, f"QMP {command} on qemu pid {handle.pid}"):
                try:
                    # The socket exists from before QEMU started, so connect needs no retries to find it: it waits
                    # in the backlog for QEMU's greeting, and fails if QEMU dies and the socket closes.
                    client = await qmpconnect.connect(f"banger-{handle.pid}", os.fspath(handle.control_socket))
                    result = await client.execute(command, arguments)
                except (QMPError, OSError) as exc:
                    detail = _log_tail(handle.run_dir / VMM_LOG)
                    raise ToolError(
                        f"QMP {command} failed on qemu pid {handle.pid}: {exc}; qemu says: {detail}"
                    ) from exc
        finally:
            if client is not None:
                with contextlib.suppress(QMPError, OSError):
                    await client.disconnect()
        return result

    def adopt(self, handle: VmmHandle) -> VmmHandle | None:
        """The handle if its QEMU process (same pid and start time) and QMP socket are still there."""
        if handle.kind is not self.kind or not process.matches(handle) or not _is_socket(handle.control_socket):
            return None
        return handle

    def is_alive(self, handle: VmmHandle) -> bool:
        """Whether this handle's QEMU process still runs."""
        return process.matches(handle)

    async def stop(self, handle: VmmHandle, timeout: float) -> StopOutcome:
        """ACPI power button via QMP system_powerdown; kill if the guest has not shut down within `timeout`."""
        return await process.stop_gracefully(
            handle, timeout, lambda: self.qmp(handle, "system_powerdown"), "the power button"
        )

    async def kill(self, handle: VmmHandle) -> None:
        """Kill QEMU and remove its sockets."""
        try:
            await process.kill(handle)
        finally:
            process.remove_sockets(handle)
