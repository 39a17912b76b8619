"""Confined VMMs: each QEMU runs as its own unprivileged uid, with no new privileges, no capabilities, its seccomp
sandbox on, in its own cgroups, and with every privileged resource opened by the daemon and passed in.

`QemuDriver.launch` builds its command line as before and hands it here (`confine_qemu`), which returns the
command that actually runs and the extra descriptors to pass:
- the TAP is opened by the daemon (TUNSETIFF on /dev/net/tun) and given as `tap,fd=N`;
- kernel, initrd, disks and the console log are opened by the daemon and named `/dev/fd/N`: the VMM needs no
  path into the state root (which stays root's), and its per-VM files are chowned to its uid, mode 0600;
- `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`;
- the chain `python -m banger.drivers.confine_exec CGROUPS -- setpriv --reuid U --regid U --clear-groups
  --no-new-privs --inh-caps=-all --bounding-set=-all -- qemu ...` joins the cgroups, drops to the uid, execs.
One uid per VM (the lowest free one of a range, see `VMM_UID_BASE`) so that an escaped VMM cannot ptrace or
signal another. `report()` tells `banger doctor` what is in force and what the host lacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger.drivers import cgroups, process
from banger.drivers.base import VmSpec
from banger.errors import ToolError

log = logging.getLogger("banger.drivers.confine")

VMM_UID_BASE = 900_000  # setup.sh creates the user `banger-vmm` with this uid; VMMs use BASE+1 ... BASE+COUNT
VMM_UID_COUNT = 4096
VMM_GID = VMM_UID_BASE  # the group every VMM holds: it may read snapshots (see snapshots/service.py)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SETPRIV = "setpriv"

_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000

# Spawns pick a free uid and start under one lock, so two VMs starting together never share a uid.
_spawn_lock = threading.Lock()


@dataclass
class Confined:
    """A confined command line: argv to spawn, descriptors to pass (closed by `close()` once spawned)."""

    argv: list[str]
    pass_fds: list[int]
    uid: int
    cgroups: list[Path] = field(default_factory=list)
    _owned: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Close the daemon's copies of the descriptors handed to the VMM."""
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()


def enabled() -> bool:
    """Confinement needs root (to switch uids, open TAPs and make cgroups) and setpriv; BANGER_CONFINE=0 turns it
    off (to tell a confinement problem from another while debugging)."""
    if os.environ.get("BANGER_CONFINE") == "0":
        return False
    return os.geteuid() == 0 and shutil.which(SETPRIV) is not None


def _uids_in_use() -> set[int]:
    used: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                used.add(entry.stat().st_uid)
    return used


# uid -> (pid, start time) of each VMM this daemon spawned: until it has dropped to its uid (a moment after the
# spawn) no process shows that uid yet, and a VM starting meanwhile must not be given the same one.
_handed_out: dict[int, tuple[int, int | None]] = {}


def _reserved() -> set[int]:
    for uid, (pid, started) in list(_handed_out.items()):
        if started is None or process.start_time(pid) != started:
            del _handed_out[uid]
    return set(_handed_out)


def spawn_lock() -> threading.Lock:
    """Held from picking a free uid until the VMM that takes it is spawned and handed it (`hand_out`)."""
    return _spawn_lock


def hand_out(uid: int, pid: int, started: int | None) -> None:
    """Reserve `uid` for the VMM `pid` until it exits (it may not show that uid yet)."""
    _handed_out[uid] = (pid, started)


def free_uid() -> int:
    """The lowest VMM uid that no running process has, none of our VMMs is about to take, and whose cgroup is
    empty (a VMM spawned by a daemon since killed is in its group before it drops to its uid)."""
    used = _uids_in_use() | _reserved()
    for uid in range(VMM_UID_BASE + 1, VMM_UID_BASE + 1 + VMM_UID_COUNT):
        if uid not in used and not cgroups.in_use(f"vm-{uid}"):
            return uid
    raise ToolError(f"all {VMM_UID_COUNT} VMM uids are in use")


def open_tap(name: str) -> int:
    """A descriptor attached to the existing TAP `name` (the daemon's privilege, the VMM's use)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise ToolError(f"cannot attach to TAP {name}: {exc.strerror}") from exc
    return fd


def _opt(value: str | os.PathLike[str]) -> str:
    return os.fspath(value).replace(",", ",,")


def _hand_over(path: Path, flags: int, uid: int, owned: list[int], private: bool) -> str:
    """Open `path` for the VMM and return the name it uses for it; private files become the uid's alone."""
    try:
        if private:
            os.chown(path, uid, uid)
            os.chmod(path, 0o600)
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise ToolError(f"cannot open {path} for the VMM: {exc.strerror}") from exc
    owned.append(fd)
    return f"/dev/fd/{fd}"


def confine_qemu(argv: Sequence[str], pass_fds: Sequence[int], spec: VmSpec) -> Confined:
    """The confined form of a QEMU command line built by QemuDriver.argv (see the module docstring)."""
    uid = free_uid()
    owned: list[int] = []
    try:
        out = [str(a) for a in argv]
        swaps: dict[str, str] = {}
        spec.console_log.touch()
        swaps[_opt(spec.console_log)] = _hand_over(spec.console_log, os.O_WRONLY | os.O_APPEND, uid, owned, True)
        swaps[_opt(spec.kernel)] = _hand_over(spec.kernel, os.O_RDONLY, uid, owned, False)
        if spec.initrd is not None:
            swaps[_opt(spec.initrd)] = _hand_over(spec.initrd, os.O_RDONLY, uid, owned, False)
        for disk in spec.disks:
            flags = os.O_RDONLY if disk.read_only else os.O_RDWR
            swaps[_opt(disk.path)] = _hand_over(disk.path, flags, uid, owned, True)
        out = [_swap(a, swaps) for a in out]
        # The disks' paths stay on the command line (as inert labels): a restarted daemon finds a VMM it never
        # recorded by its root disk there (VmService._kill_unrecorded).
        for i, disk in enumerate(spec.disks):
            out += ["-object", f"secret,id=banger-disk{i},data={_opt(disk.path)}"]
        if spec.net is not None:
            tap_fd = open_tap(spec.net.tap)
            owned.append(tap_fd)
            old = f"tap,id=net0,ifname={_opt(spec.net.tap)},script=no,downscript=no"
            out = [f"tap,id=net0,fd={tap_fd}" if a == old else a for a in out]
        for fd in pass_fds:
            # A pipe the VMM reopens by name (`logfile=/dev/fd/N` of the console writer) is checked against the
            # pipe's owner, which is root: give it to the VMM's uid, as its files are.
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.fchown(fd, uid, uid)
        if spec.disks:
            # The VM's own directory becomes the VMM's: QEMU creates the qcow2 overlay that holds the guest's writes
            # while a snapshot copies the frozen disk (blockdev-snapshot-sync names a path, not a descriptor).
            vm_dir = spec.disks[0].path.parent
            os.chown(vm_dir, uid, uid)
            os.chmod(vm_dir, 0o700)
            os.chmod(vm_dir.parent, 0o711)
        out += ["-sandbox", SANDBOX]
        limits = cgroups.Limits.for_vm(spec.vcpus, spec.memory_mib)
        with contextlib.suppress(OSError):
            cgroups.collect()
        groups = cgroups.create(f"vm-{uid}", limits)
        chain = [sys.executable, "-I", "-m", "banger.drivers.confine_exec", *map(str, groups), "--"]
        kvm = kvm_group() if _uses_kvm(argv) else None
        # Every VMM also holds the shared VMM group, which may read snapshots (the memory image and frozen disk a
        # clone maps and reads by path); nothing else of the state root is the group's.
        groups_opt = "--groups=" + ",".join(str(g) for g in (VMM_GID, kvm) if g is not None)
        drop = [shutil.which(SETPRIV) or SETPRIV, f"--reuid={uid}", f"--regid={uid}", groups_opt]
        drop += ["--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
        for fd in owned:
            os.set_inheritable(fd, True)
        return Confined(chain + drop + out, [*pass_fds, *owned], uid, groups, owned)
    except BaseException:
        for fd in owned:
            os.close(fd)
        raise


def _swap(arg: str, swaps: dict[str, str]) -> str:
    for old, new in swaps.items():
        if arg == old:
            return new
        for key in ("file=", "path=", "logfile="):
            arg = arg.replace(f"{key}{old},", f"{key}{new},")
            if arg.endswith(f"{key}{old}"):
                arg = arg[: -len(old)] + new
    return arg


def kvm_group() -> int | None:
    """The group through which an unprivileged VMM may open /dev/kvm (None: only root can)."""
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    return st.st_gid if st.st_gid != 0 and st.st_mode & 0o060 == 0o060 else None


def _uses_kvm(argv: Sequence[str]) -> bool:
    return any(a == "-accel" and i + 1 < len(argv) and argv[i + 1].startswith("kvm") for i, a in enumerate(argv))


def spawn_qemu(argv: Sequence[str], pass_fds: Sequence[int], spec: VmSpec, *, log_file: Path) -> int:
    """Start QEMU confined when this host allows it (see `enabled`), else as before; returns its pid."""
    if not enabled():
        return process.spawn(argv, log_file=log_file, pass_fds=pass_fds)
    if _uses_kvm(argv) and kvm_group() is None:
        # QEMU 7.2 opens /dev/kvm itself and takes no descriptor for it; with it root-only, confinement would
        # stop the VM from booting at all, so this VM runs as before and doctor says why.
        log.warning("qemu for %s unconfined: /dev/kvm is not group-accessible (udev's kvm group)", spec.name)
        return process.spawn(argv, log_file=log_file, pass_fds=pass_fds)
    with _spawn_lock:
        confined = confine_qemu(argv, pass_fds, spec)
        try:
            pid = process.spawn(confined.argv, log_file=log_file, pass_fds=confined.pass_fds)
        finally:
            confined.close()
        hand_out(confined.uid, pid, process.start_time(pid))
        # The VMM joins its groups itself before it execs; doing it here too means the groups are in use before
        # the lock goes, so a concurrent spawn's `collect` cannot remove them under it.
        cgroups.join(confined.cgroups, pid)
    log.info("qemu for %s confined: uid %d, cgroups %s", spec.name, confined.uid, [str(g) for g in confined.cgroups])
    return pid


def status_of(pid: int) -> dict[str, str]:
    """Uid, Seccomp and NoNewPrivs of a running process, from /proc/PID/status."""
    wanted = ("Uid", "Seccomp", "NoNewPrivs", "CapEff")
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = value.split()[0]
    return out


def report(firecracker: str = "firecracker") -> dict[str, Any]:
    """What confinement this host gives VMMs, and what it lacks (for `banger doctor`)."""
    version, found = cgroups.layout()
    lacking: list[str] = []
    if os.geteuid() != 0:
        lacking.append("bangerd is not root: VMMs run as its user, unconfined")
    if shutil.which(SETPRIV) is None:
        lacking.append("setpriv (util-linux) not found: VMMs cannot drop to their own uid")
    if os.path.exists("/dev/kvm") and kvm_group() is None:
        lacking.append("/dev/kvm is root-only: VMs using KVM run unconfined (give it to a kvm group, mode 0660)")
    if version is cgroups.Version.NONE:
        lacking.append(f"no cgroup hierarchy with {', '.join(cgroups.CONTROLLERS)}: no per-VM limits")
    from banger.drivers import fcjail  # fcjail builds on this module

    jailer = fcjail.jailer_beside(firecracker)
    if jailer is None:
        lacking.append(f"no jailer beside {firecracker}: Firecracker would run unjailed (scripts/setup.sh installs it)")
    return {
        "qemu": {
            "enabled": enabled(),
            "uid_range": f"{VMM_UID_BASE + 1}-{VMM_UID_BASE + VMM_UID_COUNT}",
            "seccomp_sandbox": SANDBOX,
            "no_new_privs": True,
            "fds_passed": ["tap", "kernel", "initrd", "disks", "console log", "qmp", "agent"],
        },
        "cgroups": {"version": version.value, "controllers": {k: str(v) for k, v in found.items()}},
        "firecracker_jailer": jailer,
        "firecracker_jailed": enabled() and jailer is not None,
        "missing": lacking,
    }
