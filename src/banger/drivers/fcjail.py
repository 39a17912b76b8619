"""Firecracker under its jailer: a chroot of its own, an unprivileged uid, cgroups, and its seccomp filters.

`jailer --id ID --exec-file FIRECRACKER --uid U --gid U --chroot-base-dir RUN_DIR --cgroup-version V
--parent-cgroup banger --cgroup ... -- --api-sock /api.sock` makes `RUN_DIR/firecracker/ID/root`, copies the binary
in, creates the device nodes Firecracker needs there, joins `banger/ID` under each cgroup controller, pivots into
the chroot, drops to the uid and execs Firecracker (same pid: the daemon's record holds). Everything Firecracker
opens by path must therefore be inside the chroot: kernel, initrd and disks are hard-linked in before the spawn
(the state root is one filesystem; a read-only file from elsewhere is copied), the writable ones handed to the
VM's uid (as confined QEMU's are). Its API socket, vsock socket and logs live in the chroot, and the run directory
keeps symlinks under the usual names, so the rest of banger (the agent client, logs, adoption) is unchanged.
A TAP is given to the uid (TUNSETOWNER), which is what lets an unprivileged Firecracker attach to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from banger.drivers import cgroups, confine
from banger.drivers.base import VmmHandle, VmSpec
from banger.errors import InvalidInputError, ToolError

JAILER = "jailer"
JAIL_API_SOCKET = "api.sock"
JAIL_AGENT_SOCKET = "agent.sock"
_TUNSETOWNER = 0x400454CC
_TUNSETGROUP = 0x400454CE


def jailer_beside(firecracker: str) -> str | None:
    """The jailer binary next to this Firecracker binary, when there is one (setup installs both together)."""
    found = shutil.which(firecracker)
    if found is None:
        return None
    candidate = Path(found).resolve().parent / JAILER
    return str(candidate) if os.access(candidate, os.X_OK) else None


def wanted(firecracker: str) -> str | None:
    """The jailer to use: root, confinement not turned off (BANGER_CONFINE=0), and a jailer beside the binary."""
    if not confine.enabled():
        return None
    return jailer_beside(firecracker)


@dataclass
class Jail:
    """The chroot of one Firecracker, and the uid it runs as."""

    run_dir: Path
    jail_id: str
    uid: int

    @property
    def root(self) -> Path:
        return self.run_dir / "firecracker" / self.jail_id / "root"

    @property
    def api_socket(self) -> Path:
        return self.root / JAIL_API_SOCKET

    def inside(self, host: Path) -> str:
        """The path Firecracker sees for a host path that lies in the chroot."""
        return "/" + os.fspath(host.relative_to(self.root))

    def prepare(self) -> None:
        """A fresh chroot directory (a previous run's is removed)."""
        shutil.rmtree(self.run_dir / "firecracker", ignore_errors=True)
        self.root.mkdir(parents=True)

    def bring_in(self, host: Path, name: str, *, private: bool) -> str:
        """Put `host` into the chroot as /NAME; returns /NAME.

        A private file (a disk) is hard-linked and becomes the VM uid's, mode 0600, as confined QEMU's disks are
        (a copy would lose the guest's writes). A shared one (kernel, initrd) is hard-linked when anyone may read
        it, else copied for the uid alone."""
        target = self.root / name
        try:
            host = host.resolve(strict=True)  # a link's target, not the link (which would dangle in the chroot)
        except OSError as exc:
            raise InvalidInputError(f"cannot bring {host} into Firecracker's jail: {exc.strerror}") from exc
        if private:
            try:
                os.link(host, target)
            except OSError as exc:
                raise ToolError(f"cannot bring {host} into Firecracker's jail: {exc.strerror}") from exc
            os.chown(target, self.uid, self.uid)
            os.chmod(target, 0o600)
        elif host.stat().st_mode & 0o004:
            try:
                os.link(host, target)
            except OSError:  # another filesystem, say
                shutil.copyfile(host, target)
        else:
            shutil.copyfile(host, target)
            os.chown(target, self.uid, self.uid)
            os.chmod(target, 0o400)
        return "/" + name

    def argv(self, jailer: str, firecracker: str, spec: VmSpec) -> list[str]:
        """The jailer's command line for this VM."""
        return self.command(jailer, firecracker, spec.vcpus, spec.memory_mib)

    def command(self, jailer: str, firecracker: str, vcpus: int, memory_mib: int) -> list[str]:
        """The jailer's command line for a VM of this size."""
        out = [jailer, "--id", self.jail_id, "--exec-file", str(Path(shutil.which(firecracker) or firecracker))]
        out += ["--uid", str(self.uid), "--gid", str(self.uid), "--chroot-base-dir", os.fspath(self.run_dir)]
        version, _found = cgroups.layout()
        if version is not cgroups.Version.NONE:
            limits = cgroups.Limits.for_vm(vcpus, memory_mib)
            out += ["--cgroup-version", "2" if version is cgroups.Version.V2 else "1"]
            out += ["--parent-cgroup", cgroups.PARENT]
            if version is cgroups.Version.V2:
                values = {
                    "memory.max": limits.memory_bytes,
                    "pids.max": limits.pids,
                    "cpu.max": f"{limits.cpu_quota_us} {limits.cpu_period_us}",
                }
            else:
                values = {
                    "memory.limit_in_bytes": limits.memory_bytes,
                    "pids.max": limits.pids,
                    "cpu.cfs_period_us": limits.cpu_period_us,
                    "cpu.cfs_quota_us": limits.cpu_quota_us,
                }
            for key, value in values.items():
                out += ["--cgroup", f"{key}={value}"]
        return out + ["--", "--api-sock", "/" + JAIL_API_SOCKET]  # the jailer passes --id itself

    def remove(self) -> None:
        """Remove the chroot (the hard links in it, not the files they name)."""
        shutil.rmtree(self.run_dir / "firecracker", ignore_errors=True)


def link_name(run_dir: Path, name: str, target: Path) -> Path:
    """run_dir/NAME as a symlink to `target` (in the chroot), so readers keep their usual path."""
    path = run_dir / name
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.symlink_to(target)
    return path


def give_tap(name: str, uid: int) -> None:
    """Make the persistent TAP `name` the uid's (owner and group), so the jailed Firecracker may attach to it."""
    fd = confine.open_tap(name)  # attached as confined QEMU's TAPs are
    try:
        fcntl.ioctl(fd, _TUNSETOWNER, uid)
        fcntl.ioctl(fd, _TUNSETGROUP, uid)
    except OSError as exc:
        raise ToolError(f"cannot give TAP {name} to the VMM's uid: {exc.strerror}") from exc
    finally:
        os.close(fd)


def root_of(handle: VmmHandle) -> Path | None:
    """The chroot of a jailed Firecracker (None for one that runs unjailed)."""
    root = handle.control_socket.parent
    jailed = handle.control_socket.name == JAIL_API_SOCKET and root.name == "root"
    return root if jailed and root.parent.parent.name == "firecracker" else None


def remove_jail_of(handle: VmmHandle) -> None:
    """Remove the chroot of a jailed Firecracker that has ended (nothing for one that ran unjailed)."""
    root = root_of(handle)
    if root is None:
        return
    # The logs the run directory links to come out of the chroot first, so they outlive it.
    with contextlib.suppress(OSError):
        for entry in handle.run_dir.iterdir():
            if not entry.is_symlink() or Path(os.readlink(entry)).parent != root:
                continue
            target = Path(os.readlink(entry))
            with contextlib.suppress(OSError):
                if target.is_file() and not target.is_symlink():
                    os.replace(target, entry)
                else:
                    entry.unlink()
    shutil.rmtree(root.parent.parent, ignore_errors=True)
