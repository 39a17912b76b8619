"""VMM processes: spawned detached so they outlive the daemon, found again by pid + start time, awaited via pidfd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from banger.drivers import cgroups, consolelog
from banger.drivers.base import StopOutcome, VmmHandle, VmSpec
from banger.errors import BangerError, InvalidInputError, TimeoutError_, ToolError

log = logging.getLogger("banger.drivers")

# Our own children, so their exit status can be collected; adopted VMMs are reaped by init instead.
_children: dict[int, subprocess.Popen[bytes]] = {}


# The environment variable that marks a VMM banger spawned with its VM's run directory.
TAG_VAR = "BANGER_VMM_RUN_DIR"

# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def check_socket_paths(*paths: Path) -> None:
    """Refuse up front a Unix socket path too long to bind, rather than failing deep inside a VMM."""
    for path in paths:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise InvalidInputError(
                f"socket path too long for a Unix socket ({len(os.fsencode(path))} > {MAX_SOCKET_PATH} bytes): {path}",
                hint="use a shorter BANGER_HOME",
            )


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None if there is no such live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    state = fields[0]
    if state in (b"Z", b"X"):
        return None
    return int(fields[19])


def console_writer(spec: VmSpec) -> consolelog.Writer:
    """Start the VM's capped console log writer (consolelog.py); its pipe's write end is for the VMM.

    The caller closes the fd once the VMM holds its copy; the writer exits when the VMM's copy closes too.
    """
    try:
        return consolelog.start(spec.console_log, spec.console_log_max_bytes)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolError(f"cannot start the console log writer for {spec.console_log}: {exc}") from exc


async def writer_gone(pid: int, timeout: float = 5.0) -> None:
    """After a failed launch: wait for the console writer to see the end of its pipe and exit (else kill it)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, exited.set)
        try:
            await asyncio.wait_for(exited.wait(), timeout)
        except TimeoutError:
            log.warning("console log writer %d did not exit with its VMM; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def spawn(
    argv: Sequence[str], *, log_file: Path, stdout_file: Path | int | None = None, pass_fds: Sequence[int] = ()
) -> int:
    """Start a long-running VMM in its own session with stdio on files (stdout may be an fd); return its pid.

    The VMM's log lives in its VM's run directory, and the process carries that directory in its environment
    (TAG_VAR): a daemon that died before recording the pid finds exactly this VMM again with `tagged_pids`.
    """
    log.debug("spawn: %s", shlex.join(argv))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, TAG_VAR: os.fspath(log_file.parent.resolve())}
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(log_file, "ab"))
        out = err
        if stdout_file is not None:
            out = stack.enter_context(open(stdout_file, "ab", closefd=not isinstance(stdout_file, int)))
        devnull = stack.enter_context(open(os.devnull, "rb"))
        try:
            child = subprocess.Popen(
                list(argv),
                stdin=devnull,
                stdout=out,
                stderr=err,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        except OSError as exc:
            raise ToolError(f"cannot start {Path(argv[0]).name}: {exc}") from exc
    _children[child.pid] = child
    return child.pid


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def matches(handle: VmmHandle) -> bool:
    """Whether the handle's pid is still the same live process (not exited, not a reused pid)."""
    alive = start_time(handle.pid) == handle.start_time
    if not alive:
        # Reap after looking, not before: a child that turns zombie between a reap and the look would otherwise
        # be reported gone and stay a zombie of the daemon for its lifetime.
        _reap(handle.pid)
    return alive


async def _collect(pid: int, timeout: float = 5.0) -> None:
    """Reap our exited child `pid`, and any other exited child on the way.

    A pidfd turns readable once the process has exited, but for a multi-threaded process (QEMU, Firecracker)
    waitpid may not see it yet at that instant: without a retry the VMM stays a zombie of the daemon.
    """
    reap_exited()
    deadline = asyncio.get_running_loop().time() + timeout
    while pid in _children and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        reap_exited()
    if pid in _children:
        log.warning("VMM pid %d exited but could not be reaped within %ss", pid, timeout)


def reap_exited() -> list[int]:
    """Collect every exited child banger spawned (whatever path noticed the exit); returns their pids."""
    done = [pid for pid, child in _children.items() if child.poll() is not None]
    for pid in done:
        del _children[pid]
    return done


async def wait_exit(handle: VmmHandle, timeout: float) -> bool:
    """Wait until the process exits; True if it did within `timeout` seconds."""
    try:
        pidfd = os.pidfd_open(handle.pid)
    except ProcessLookupError:
        _reap(handle.pid)
        return True
    try:
        if not matches(handle):
            await _collect(handle.pid)
            return True
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        # A pidfd turns readable when the process exits, child of ours or not: no polling of /proc.
        loop.add_reader(pidfd, exited.set)
        try:
            await asyncio.wait_for(exited.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(pidfd)
        await _collect(handle.pid)
        return True
    finally:
        os.close(pidfd)


async def kill(handle: VmmHandle, timeout: float = 10.0) -> None:
    """SIGKILL the process (if it is still the same one) and wait for it to be gone."""
    try:
        pidfd = os.pidfd_open(handle.pid)
    except ProcessLookupError:
        _reap(handle.pid)
        return
    try:
        if not matches(handle):
            await _collect(handle.pid)
            return
        # Signalling through the pidfd cannot hit a process that reused the pid after our check.
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)
    if not await wait_exit(handle, timeout):
        raise ToolError(f"VMM process {handle.pid} did not die after SIGKILL within {timeout}s")


async def stop_gracefully(
    handle: VmmHandle, timeout: float, ask: Callable[[], Awaitable[object]], what: str
) -> StopOutcome:
    """Ask the guest to shut down with `ask`, wait up to `timeout` for the VMM to exit, else SIGKILL it.

    Sockets are removed whichever way it ends. `what` names the request in logs (e.g. "the power button").
    """
    if not matches(handle):
        remove_sockets(handle)
        return StopOutcome.ALREADY_GONE
    outcome = StopOutcome.KILLED
    try:
        try:
            await ask()
        except BangerError as exc:
            log.warning("graceful stop of %s pid %d impossible, killing it: %s", handle.kind, handle.pid, exc)
        else:
            if await wait_exit(handle, timeout):
                outcome = StopOutcome.GRACEFUL
            else:
                log.info("guest of %s pid %d ignored %s for %ss; killing", handle.kind, handle.pid, what, timeout)
        if outcome is StopOutcome.KILLED:
            await kill(handle)
    finally:
        remove_sockets(handle)
    return outcome


def tagged_pids(run_dir: Path, proc_root: Path = Path("/proc")) -> list[int]:
    """Pids of live processes that `spawn` started for `run_dir` (exactly: by the tag in their environment).

    A process that merely names a VM's files on its command line (an admin's `less` of the root disk) has no
    such tag and is never returned.
    """
    needle = os.fsencode(f"{TAG_VAR}={os.fspath(run_dir.resolve())}")
    found = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if needle in environ and start_time(int(entry.name)) is not None:
            found.append(int(entry.name))
    # A jailed Firecracker runs with an emptied environment, in the cgroups its jailer named after the run
    # directory (fcjail.py): those find it just as exactly.
    if proc_root == Path("/proc"):
        for pid in cgroups.pids_in(run_dir.name):
            if pid not in found and start_time(pid) is not None:
                found.append(pid)
    return found


def remove_sockets(handle: VmmHandle) -> None:
    """Remove the sockets and per-run files a VMM leaves behind."""
    for path in (handle.control_socket, *handle.cleanup_paths):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)


@contextlib.asynccontextmanager
async def deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """Turn asyncio's timeout into a TimeoutError_ that names what was being waited for."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise TimeoutError_(f"{what} took longer than {seconds}s") from exc
