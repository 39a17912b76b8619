"""banger-init: PID 1 of a banger guest, run from the seed drive by the image's /sbin/banger-init stub (or, doing
the stub's work itself, by banger's initramfs).

Stdlib only, and it must never import banger. It mounts what the stub did not, names the host, configures the
network from meta.json, starts the agent and keeps it running, reaps orphans, and powers the machine off on
SIGTERM, on SIGINT (Ctrl-Alt-Del, once CAD is routed to init) or when the agent relays a host's poweroff request.
Everything it does is logged as `banger-init: ...` lines on the console. Pure helpers are unit-tested on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

SEED_DIR = "/run/banger/seed"
META_PATH = f"{SEED_DIR}/meta.json"
READY_MARKER = "banger-init: ready"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TERM_GRACE = 5.0
KILL_GRACE = 2.0
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
RB_DISABLE_CAD = 0
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RDONLY, MS_REMOUNT = 0x2, 0x4, 0x8, 0x1, 0x20
EV_KEY, KEY_POWER = 1, 116
# struct input_event on 64-bit Linux: struct timeval, __u16 type, __u16 code, __s32 value.
INPUT_EVENT = struct.Struct("qqHHi")
POWER_BUTTON_NAMES = {"Power Button"}  # what the ACPI button driver calls its input devices
SHUTDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGPWR, signal.SIGUSR2}
WATCHED = {signal.SIGCHLD, signal.SIGHUP, *SHUTDOWN_SIGNALS}
AGENT_NAME = "banger-agent"
AGENT_ENV = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
PR_SET_NAME = 15
# Modules that stdlib modules banger's guest code needs import eagerly, for what banger never asks of them: asyncio
# imports ssl (the agent does no TLS), shutil imports bz2 and lzma (archive formats). Under TCG each costs the boot
# tens of milliseconds (their .so files and libraries are read and linked), so they are kept out while those load.
UNNEEDED_AT_BOOT = ("ssl", "bz2", "lzma")
CONSOLE_HOLD = 20.0  # seconds the console's login shell waits at most for the agent to serve


@dataclass(frozen=True)
class MountSpec:
    """One pseudo-filesystem init makes sure of."""

    source: str
    target: str
    fstype: str
    flags: int
    data: str = ""


BASE_MOUNTS = (
    MountSpec("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    MountSpec("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    MountSpec("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    MountSpec("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    MountSpec("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    MountSpec("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    MountSpec("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)


def say(message: str) -> None:
    """One console line; never fails (a broken console must not kill PID 1)."""
    try:
        print(f"banger-init: {message}", flush=True)
    except OSError:
        pass


# ---- pure helpers (unit-tested on the host) ----


def parse_mountinfo(text: str) -> set[str]:
    """Mount points listed in /proc/self/mountinfo (octal escapes decoded)."""
    points = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(fields[4].encode().decode("unicode_escape"))
    return points


def plan_mounts(mounted: set[str]) -> list[MountSpec]:
    """Base mounts still missing; never one over a directory that already has mounts below it (the seed)."""
    return [
        m for m in BASE_MOUNTS if m.target not in mounted and not any(p.startswith(m.target + "/") for p in mounted)
    ]


def network_commands(network: dict[str, Any] | None, names_by_mac: dict[str, str]) -> list[list[str]]:
    """`ip` argument lists that bring up loopback and each interface from meta.json's network section."""
    cmds = [["ip", "link", "set", "dev", "lo", "up"]]
    for iface in (network or {}).get("interfaces", []):
        name = str(iface["name"])
        current = names_by_mac.get(str(iface["mac"]).lower(), name)
        if current != name:
            cmds.append(["ip", "link", "set", "dev", current, "name", name])
        if iface.get("mtu"):
            cmds.append(["ip", "link", "set", "dev", name, "mtu", str(iface["mtu"])])
        cmds.append(["ip", "address", "add", f"{iface['address']}/{iface['prefix']}", "dev", name])
        cmds.append(["ip", "link", "set", "dev", name, "up"])
        if gateway := iface.get("gateway"):
            family = ["-6"] if ":" in str(gateway) else ["-4"]
            cmds.append(["ip", *family, "route", "add", "default", "via", str(gateway), "dev", name])
    return cmds


def resolv_conf(network: dict[str, Any] | None) -> str | None:
    """/etc/resolv.conf text for the metadata's nameservers and search domains; None when there are none."""
    if not network or not (network.get("nameservers") or network.get("search")):
        return None
    lines = ["# written by banger-init from the seed drive"]
    if network.get("search"):
        lines.append("search " + " ".join(network["search"]))
    lines += [f"nameserver {ns}" for ns in network.get("nameservers", [])[:3]]  # the resolver reads three at most
    return "\n".join(lines) + "\n"


def hosts_file(hostname: str) -> str:
    """/etc/hosts text that lets the guest resolve its own name."""
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{hostname}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )


def agent_args(meta: dict[str, Any]) -> list[str]:
    """The agent's command-line arguments for the transport meta.json asks for."""
    agent = meta.get("agent") or {}
    transport = agent.get("transport", "auto")
    args = ["--init-pid", "1"]
    if transport in ("auto", "virtio-serial"):
        args += ["--serial", str(agent.get("serial_port", "org.banger.agent"))]
    if transport in ("auto", "vsock"):
        args += ["--vsock", str(agent.get("vsock_port", 1024))]
    return args


def power_key_pressed(data: bytes) -> bool:
    """Whether a read from an evdev device holds a power-key press."""
    size = INPUT_EVENT.size
    for offset in range(0, len(data) - size + 1, size):
        _sec, _usec, kind, code, value = INPUT_EVENT.unpack_from(data, offset)
        if kind == EV_KEY and code == KEY_POWER and value == 1:
            return True
    return False


def halt_command(meta: dict[str, Any] | None) -> int:
    """reboot(2) command that ends this VM: Firecracker exits on a guest reboot but not on a power-off."""
    return RB_AUTOBOOT if (meta or {}).get("halt") == "reboot" else RB_POWER_OFF


# ---- effects ----

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def do_mount(m: MountSpec) -> None:
    """mount(2) one filesystem, creating its mount point if needed."""
    os.makedirs(m.target, exist_ok=True)
    _check(_libc.mount(m.source.encode(), m.target.encode(), m.fstype.encode(), m.flags, m.data.encode()), m.target)


def mount_base() -> None:
    """Mount the pseudo-filesystems the stub did not."""
    if not os.path.ismount("/proc"):
        do_mount(BASE_MOUNTS[0])
    with open("/proc/self/mountinfo") as f:
        mounted = parse_mountinfo(f.read())
    for m in plan_mounts(mounted):
        try:
            do_mount(m)
        except OSError as exc:
            say(f"warning: cannot mount {m.fstype} on {m.target}: {exc}")


def ensure_console() -> None:
    """Give init stdio on /dev/console if the kernel could not (no /dev/console in the image)."""
    try:
        os.fstat(1)
    except OSError:
        fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
        for target in (0, 1, 2):
            os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)


def write_etc(path: str, text: str) -> None:
    """Replace a file (or a dangling symlink such as resolv.conf's) atomically; log if the root is read-only."""
    tmp = f"{path}.banger-tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        say(f"warning: cannot write {path}: {exc}")


def names_by_mac(sysfs: str = "/sys/class/net") -> dict[str, str]:
    """Current interface names keyed by lowercase MAC."""
    found = {}
    for name in os.listdir(sysfs):
        try:
            with open(f"{sysfs}/{name}/address") as f:
                found[f.read().strip().lower()] = name
        except OSError:
            continue
    return found


def import_without(hidden: tuple[str, ...], modules: tuple[str, ...]) -> None:
    """Import `modules` while the not yet imported modules named in `hidden` cannot be, then make those importable
    again (the imported modules keep the fallback they chose for each)."""
    absent = [name for name in hidden if name not in sys.modules]
    for name in absent:
        sys.modules[name] = None  # type: ignore[assignment]  # what `import` then refuses with ImportError
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        for name in absent:
            del sys.modules[name]


def configure_network(network: dict[str, Any] | None) -> None:
    """Bring up loopback and the metadata's interfaces, addresses and routes with one `ip -batch` run (one run per
    command where `ip` is busybox's, which has no -batch).

    One process for every command: each process start costs the boot ~0.1 s under TCG. -force goes on past a failed
    command, as separate runs did, and names it on stderr.
    """
    import_without(UNNEEDED_AT_BOOT, ("shutil",))
    import shutil

    ip = shutil.which("ip", path=DEFAULT_PATH)
    if ip is None:
        say("warning: no `ip` tool in the image; network left unconfigured")
        return
    commands = network_commands(network, names_by_mac())
    problems: list[str] = []
    try:
        if os.path.basename(os.path.realpath(ip)) == "busybox":  # busybox ip has no -batch: one run per command
            for argv in commands:
                done = subprocess.run([ip, *argv[1:]], capture_output=True, text=True, check=False, timeout=60)
                if done.returncode != 0:
                    problems.append(f"{' '.join(argv)}: {done.stderr.strip()}")
        else:
            # A batch line takes no options: the family of a route comes from its gateway's address, not -4/-6.
            lines = [[a for a in argv[1:] if a not in ("-4", "-6")] for argv in commands]
            script = "".join(" ".join(line) + "\n" for line in lines)
            argv = [ip, "-force", "-batch", "-"]
            done = subprocess.run(argv, input=script, capture_output=True, text=True, check=False, timeout=60)
            if done.returncode != 0:
                problems.append(" ".join(done.stderr.split()))
    except subprocess.TimeoutExpired:
        problems.append("`ip` did not finish within 60 s")
    if problems:
        say(f"warning: network setup failed: {'; '.join(problems)}")


def configure(meta: dict[str, Any]) -> None:
    """Hostname, /etc/hosts, network and resolv.conf from the metadata."""
    hostname = str(meta.get("hostname") or "banger")
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(hostname)
    write_etc("/etc/hosts", hosts_file(hostname))
    say(f"hostname {hostname}")
    network = meta.get("network")
    configure_network(network)
    if network:
        for iface in network.get("interfaces", []):
            say(f"network {iface['name']} {iface['address']}/{iface['prefix']} via {iface.get('gateway')}")
    if (text := resolv_conf(network)) is not None:
        write_etc("/etc/resolv.conf", text)


def start_agent(meta: dict[str, Any], inherited: list[int], ready_fd: int | None = None) -> int:
    """Fork the agent off this process and return its pid.

    A fork, not a fresh interpreter: the child already has Python running and the modules init imported (json, re,
    subprocess, ...), which under TCG saves most of a second of boot. The child first undoes what PID 1 set up for
    itself (signal handlers, the wakeup pipe, the power buttons' fds, the environment) so that the agent starts as
    if exec'd with a plain environment. `inherited` are the fds it closes; `ready_fd` is kept and passed on.
    """
    pid = os.fork()
    if pid:
        return pid
    # From here on this is the agent's process: it must never return into PID 1's stack (supervise, main), whose
    # error path would power the machine off. Every way out is os._exit.
    try:
        signal.set_wakeup_fd(-1)
        for signum in WATCHED:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        os.environ.clear()
        os.environ.update(AGENT_ENV)
        os.chdir("/")
        _libc.prctl(PR_SET_NAME, AGENT_NAME.encode(), 0, 0, 0)  # `ps -e` and `pgrep -x banger-agent` see the agent
        args = agent_args(meta) + ([] if ready_fd is None else ["--ready-fd", str(ready_fd)])
    except BaseException:
        with contextlib.suppress(BaseException):
            say("cannot prepare the agent process:\n" + traceback.format_exc())
        os._exit(1)
    try:
        run_agent(args)
    finally:
        os._exit(1)  # only reached if run_agent itself failed on its way out


def run_agent(args: list[str], seed_dir: str = SEED_DIR) -> NoReturn:
    """Run the seed's agent module's main() in this process with `args`, then exit with its status."""
    code: int = 1
    try:
        sys.path.insert(0, seed_dir)
        sys.argv = [AGENT_NAME, *args]
        sys.dont_write_bytecode = True  # the seed is read-only; what -B did when the agent was exec'd
        import_without(UNNEEDED_AT_BOOT, ("asyncio", "shutil"))
        code = importlib.import_module("agent").main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) and 0 <= exc.code <= 255 else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            with contextlib.suppress(Exception):
                print(exc.code, file=sys.stderr)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


SERIAL_CONSOLE = "/dev/ttyS0"


def start_console_shell(tty: str = SERIAL_CONSOLE) -> subprocess.Popen[bytes] | None:
    """A root login shell on the serial console, for `banger vm console` (None where there is no such port)."""
    if not os.path.exists(tty):
        return None
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "vt100"}
    fd = os.open(tty, os.O_RDWR | os.O_NOCTTY)
    try:
        # start_new_session makes the shell a session leader; TIOCSCTTY then gives it the port as its terminal,
        # so Ctrl-C and job control work on the console.
        return subprocess.Popen(
            [shell, "-l"],
            stdin=fd,
            stdout=fd,
            stderr=fd,
            env=env,
            cwd="/root" if os.path.isdir("/root") else "/",
            start_new_session=True,
            preexec_fn=_take_controlling_tty,
        )
    finally:
        os.close(fd)


def _take_controlling_tty() -> None:
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def power_buttons(sysfs: str = "/sys/class/input") -> list[int]:
    """Open the ACPI power buttons' evdev nodes (QEMU's system_powerdown presses one); none without the drivers."""
    fds = []
    for name in sorted(os.listdir(sysfs)) if os.path.isdir(sysfs) else []:
        if not name.startswith("event"):
            continue
        try:
            with open(f"{sysfs}/{name}/device/name") as f:
                if f.read().strip() not in POWER_BUTTON_NAMES:
                    continue
            fds.append(os.open(f"/dev/input/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            continue
    return fds


def reap() -> list[tuple[int, int]]:
    """Collect every exited child (PID 1 inherits all orphans)."""
    done: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, status))


def _drain(timeout: float) -> bool:
    """Reap until no process is left or `timeout` passes; True if everything is gone."""
    deadline = time.monotonic() + timeout
    while True:
        reap()
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.2))


def power_off(reason: str, command: int = RB_POWER_OFF) -> None:
    """Stop every process, sync, remount / read-only and power off (or reboot). Does not return."""
    say(f"shutting down ({reason})")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # collected with sigtimedwait below
    os.kill(-1, signal.SIGTERM)  # from PID 1, -1 means every other process
    if not _drain(TERM_GRACE):
        say("processes still running after SIGTERM; killing them")
        os.kill(-1, signal.SIGKILL)
        _drain(KILL_GRACE)
    os.sync()
    if _libc.mount(None, b"/", None, MS_REMOUNT | MS_RDONLY, None) != 0:
        say(f"warning: cannot remount / read-only: {os.strerror(ctypes.get_errno())}")
    os.sync()
    say("powering off" if command == RB_POWER_OFF else "rebooting to end the VM")
    _libc.reboot(command)
    say(f"reboot({command:#x}) failed: {os.strerror(ctypes.get_errno())}")
    sys.exit(1)


def _ignore(signum: int, frame: object) -> None:
    """Signals only need to wake the select() loop, which the wakeup fd does."""


def supervise(meta: dict[str, Any]) -> None:
    """Run the agent, restart it if it dies, reap orphans, and power off when asked."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for signum in WATCHED:
        signal.signal(signum, _ignore)
    # Signals that arrived while blocked during boot are delivered now and land in the wakeup pipe. Caught signals
    # revert to their defaults in exec'd children, and none stay blocked, so children inherit nothing odd.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
    buttons = power_buttons()
    say(f"watching {len(buttons)} power button(s)")
    # The agent says when it serves (--ready-fd); the console's login shell waits for that, or for CONSOLE_HOLD at
    # most, so that on one vCPU it does not compete with the agent's start.
    ready_r: int | None
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    agent = start_agent(meta, [wake_r, wake_w, ready_r, *buttons], ready_fd=ready_w)
    os.close(ready_w)
    console: subprocess.Popen[bytes] | None = None
    console_due: float | None = time.monotonic() + CONSOLE_HOLD
    console_started = 0.0
    say(f"{READY_MARKER[len('banger-init: ') :]} (agent pid {agent})")
    backoff, restart_at = 1.0, None
    while True:
        due = [t for t in (restart_at, console_due) if t is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        watched = [wake_r, *buttons, *([] if ready_r is None else [ready_r])]
        ready, _, _ = select.select(watched, [], [], timeout)
        if wake_r in ready:
            caught = set(os.read(wake_r, 512))
            if stop := sorted(caught & SHUTDOWN_SIGNALS):
                power_off(signal.Signals(stop[0]).name, halt_command(meta))
        for fd in set(ready) & set(buttons):
            if power_key_pressed(os.read(fd, INPUT_EVENT.size * 64)):
                power_off("power button", halt_command(meta))
        if ready_r is not None and ready_r in ready:  # the agent serves (or died before it could)
            console_due = time.monotonic()
        if console_due is not None and time.monotonic() >= console_due:
            if ready_r is not None:
                os.close(ready_r)
                ready_r = None
            console, console_started, console_due = start_console_shell(), time.monotonic(), None
        for pid, status in reap():
            if console is not None and pid == console.pid:
                if time.monotonic() - console_started < 1.0:
                    say("console shell exits at once; not restarting it")
                    console = None
                else:  # the user typed `exit` on the console: offer a fresh shell
                    console, console_started = start_console_shell(), time.monotonic()
            if pid == agent:
                say(f"agent exited ({_describe(status)}); restarting in {backoff:.0f}s")
                restart_at = time.monotonic() + backoff
                backoff = min(backoff * 2, 30.0)
        if restart_at is not None and time.monotonic() >= restart_at:
            inherited = [wake_r, wake_w, *buttons, *([] if ready_r is None else [ready_r])]
            agent, restart_at = start_agent(meta, inherited), None
            say(f"agent restarted (pid {agent})")


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def main() -> None:
    """PID 1 entry point."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        mount_base()
        ensure_console()
        say(f"starting from {SEED_DIR} (python {sys.version.split()[0]})")
        with open(META_PATH) as f:
            meta = json.load(f)
        configure(meta)
        _check(_libc.reboot(RB_DISABLE_CAD), "reboot(CAD_OFF)")  # Ctrl-Alt-Del now arrives as SIGINT
        supervise(meta)
    except Exception:
        # PID 1 must not exit (that panics the kernel and hides the reason): report, then power off cleanly.
        say("fatal error:\n" + traceback.format_exc())
        # Without metadata we cannot know the VMM: reboot ends both (QEMU runs with -no-reboot), power-off only QEMU.
        power_off("init failed", RB_AUTOBOOT)


if __name__ == "__main__":
    if os.getpid() != 1:
        sys.exit("banger-init: must run as PID 1")
    main()
