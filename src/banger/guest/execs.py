"""Processes the agent runs for the host: pipes or a pty, user switching, async fd I/O (stdlib only)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import pty
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from banger.guest.protocol import Fd, Header
else:  # run from the seed drive, where the guest modules are plain siblings
    from protocol import Fd, Header

DRAIN_GRACE = 1.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Popen cannot make a pty the controlling terminal without preexec_fn, which is unsafe in a threaded process;
# this trampoline runs after setsid() in the child, claims the terminal, then execs the real program.
_CTTY_TRAMPOLINE = (
    "import fcntl,os,sys,termios\nfcntl.ioctl(0,termios.TIOCSCTTY,0)\nos.execvp(sys.argv[1],sys.argv[1:])\n"
)


class ExecError(Exception):
    """The process could not be started."""


@dataclass(frozen=True)
class ExecSpec:
    """What the host asked to run."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    tty: bool = False
    rows: int = 24
    cols: int = 80

    @classmethod
    def from_header(cls, h: Header) -> ExecSpec:
        """Validate an EXEC frame's header."""
        argv = h.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("exec needs a non-empty argv of strings")
        env = h.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("exec env must map strings to strings")
        return cls(
            argv, env, h.get("cwd"), h.get("user"), bool(h.get("tty")), int(h.get("rows", 24)), int(h.get("cols", 80))
        )


async def _wait_fd(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def read_fd(fd: int, n: int) -> bytes:
    """Read up to `n` bytes from a non-blocking fd; b"" at EOF (including a pty whose other side closed)."""
    while True:
        try:
            return os.read(fd, n)
        except BlockingIOError:
            await _wait_fd(fd, write=False)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


async def write_fd(fd: int, data: bytes) -> None:
    """Write all of `data` to a non-blocking fd, waiting for room as needed."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _wait_fd(fd, write=True)


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Child:
    """A running process and the parent's ends of its stdio."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: int, outputs: list[tuple[Fd, int]], tty: bool) -> None:
        self.proc = proc
        self._stdin: int | None = stdin
        self._outputs = outputs
        self._tty = tty
        for fd in {stdin, *(fd for _, fd in outputs)}:
            os.set_blocking(fd, False)

    @property
    def stdin_fd(self) -> int | None:
        """The parent's end of the process's stdin (the pty master for a tty), None once closed."""
        return self._stdin

    def close_fds(self) -> None:
        """Close the parent's ends of the process's stdio (after it exited)."""
        fds = {fd for _, fd in self._outputs}
        if self._stdin is not None:
            fds.add(self._stdin)
        for fd in fds:
            os.close(fd)
        self._outputs, self._stdin = [], None

    def outputs(self) -> list[tuple[Fd, int]]:
        """(stream, fd) pairs to read the process's output from."""
        return list(self._outputs)

    async def write_stdin(self, data: bytes) -> None:
        """Feed stdin; data for a process that stopped reading is dropped."""
        if self._stdin is None:
            return
        try:
            await write_fd(self._stdin, data)
        except (BrokenPipeError, OSError):
            self.close_stdin()

    def close_stdin(self) -> None:
        """End of input: close the pipe, or type the EOF character on a terminal."""
        if self._stdin is None:
            return
        if self._tty:
            try:
                os.write(self._stdin, b"\x04")
            except OSError:
                pass  # nobody is reading the terminal any more
            return
        os.close(self._stdin)
        self._stdin = None

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size (the kernel sends SIGWINCH)."""
        if self._tty:
            _set_winsize(self._outputs[0][1], rows, cols)

    def signal(self, signum: int) -> None:
        """Deliver a signal to the process group, as a terminal would."""
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass  # already gone
        except PermissionError:
            self.proc.send_signal(signum)

    async def wait(self) -> dict[str, Any]:
        """Wait for exit without blocking the loop; returns exit_code or signal."""
        if self.proc.returncode is None:
            try:
                pidfd = os.pidfd_open(self.proc.pid)
            except ProcessLookupError:
                pidfd = -1
            if pidfd >= 0:
                try:
                    await _wait_fd(pidfd, write=False)
                finally:
                    os.close(pidfd)
            self.proc.wait()
        rc = self.proc.returncode
        return {"exit_code": rc if rc >= 0 else None, "signal": -rc if rc < 0 else None}

    async def kill(self) -> None:
        """Make sure the process is gone and its fds are closed."""
        if self.proc.returncode is None:
            self.signal(signal.SIGKILL)
            await self.wait()
        self.close_fds()


def _environment(spec: ExecSpec, pw: pwd.struct_passwd | None) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
    if pw is not None:
        env |= {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "SHELL": pw.pw_shell or "/bin/sh"}
    if spec.tty:
        env["TERM"] = "xterm-256color"
    return env | spec.env


def passwd_entry(user: str | None) -> pwd.struct_passwd | None:
    """The passwd entry of a user name or uid (ours when None); ExecError if the guest has no such user."""
    try:
        if user is None:
            return pwd.getpwuid(os.geteuid())
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user is None:
            return None
        raise ExecError(f"no such user in the guest: {user!r}") from None


def spawn(spec: ExecSpec) -> Child:
    """Start the process described by `spec`."""
    pw = passwd_entry(spec.user)
    env = _environment(spec, pw)
    cwd = spec.cwd or (pw.pw_dir if pw and os.path.isdir(pw.pw_dir) else "/")
    if not os.path.isdir(cwd):
        raise ExecError(f"working directory does not exist: {cwd}")
    if "/" not in spec.argv[0] and shutil.which(spec.argv[0], path=env["PATH"]) is None:
        raise ExecError(f"command not found: {spec.argv[0]}")
    ids: dict[str, Any] = {}
    if pw is not None and pw.pw_uid != os.geteuid():
        ids = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}
    if spec.tty:
        return _spawn_tty(spec, env, cwd, ids)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(
            spec.argv, stdin=in_r, stdout=out_w, stderr=err_w, env=env, cwd=cwd, start_new_session=True, **ids
        )
    except OSError as exc:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        raise ExecError(f"cannot run {spec.argv[0]}: {exc.strerror}") from exc
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    return Child(proc, in_w, [(Fd.OUT, out_r), (Fd.ERR, err_r)], tty=False)


def _spawn_tty(spec: ExecSpec, env: dict[str, str], cwd: str, ids: dict[str, Any]) -> Child:
    master, slave = pty.openpty()
    os.set_inheritable(master, False)
    _set_winsize(master, spec.rows, spec.cols)
    argv = [sys.executable, "-E", "-S", "-c", _CTTY_TRAMPOLINE, *spec.argv]
    try:
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True, **ids
        )
    except OSError as exc:
        os.close(master)
        raise ExecError(f"cannot run {spec.argv[0]}: {exc.strerror}") from exc
    finally:
        os.close(slave)
    return Child(proc, master, [(Fd.OUT, master)], tty=True)
