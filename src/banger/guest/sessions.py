"""Guest sessions: processes owned by a per-session supervisor, not by the agent or any connection (stdlib only).

The agent starts `sessions.py supervise DIR`, which forks twice (its own session, reparented to init) and then
owns the process for its whole life. Everything about a session lives in DIR (on the root disk, so it outlives
the agent, the host connection and the VM itself):

    spec.json    what to run (written by the agent before the supervisor starts)
    state.json   pid, state, exit code or signal, times, restarts (rewritten atomically by the supervisor)
    lock         flock'ed by the supervisor while it lives: a "running" state.json whose lock is free is lost
                 (the VM restarted, or the supervisor was killed)
    output       the bounded log of everything the process wrote (sessionlog.BoundedLog)
    control.sock the supervisor's Unix socket: one JSON line per request, one JSON line per reply
                 ({"op": "input", "data": b64, "eof": bool} | {"op": "resize", "rows", "cols"} |
                  {"op": "signal", "signal"} | {"op": "stop", "signal", "timeout"} | {"op": "watch"});
                 a watcher gets one byte whenever output was appended, and EOF when the supervisor exits
    supervisor.log  the supervisor's own stderr

Restart policies run in the supervisor; init kills it with everything else when the VM stops, so they never
outlive a VM stop.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import re
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from banger.guest import execs
    from banger.guest.sessionlog import HEADER_LEN, BoundedLog, read_header
else:  # run from the seed drive, where the guest modules are plain siblings
    import execs
    from sessionlog import HEADER_LEN, BoundedLog, read_header

DEFAULT_ROOT = "/var/lib/banger/sessions"
SPEC, STATE, LOCK, OUTPUT, CONTROL, SUPERVISOR_LOG = (
    "spec.json",
    "state.json",
    "lock",
    "output",
    "control.sock",
    "supervisor.log",
)
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
RESTART_POLICIES = ("no", "on-failure", "always")
MAX_PENDING_STDIN = 1 << 20
BACKOFF_MAX = 30.0
# A process that ran this long before failing starts the backoff over.
BACKOFF_RESET_AFTER = 10.0

# ---- state on disk ----


def validate_name(name: str) -> str:
    """A session name is a DNS-label-like word (it names a directory and appears in socket paths)."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid session name {name!r}: use 1-63 lowercase letters, digits and inner hyphens")
    return name


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a JSON file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, {} if it is missing or torn."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def supervisor_alive(directory: Path) -> bool:
    """Whether a supervisor holds this session's lock."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we just took it
    return False


def describe(directory: Path) -> dict[str, Any]:
    """The public view of one session: spec, state (running, exited or lost) and output size."""
    spec, state = read_json(directory / SPEC), read_json(directory / STATE)
    status = state.get("state", "running")
    if status == "running" and not supervisor_alive(directory):
        status = "lost"
    try:
        with open(directory / OUTPUT, "rb") as f:
            output_bytes = read_header(f.fileno()) + os.fstat(f.fileno()).st_size - HEADER_LEN
    except (OSError, ValueError):
        output_bytes = 0
    return {
        "name": directory.name,
        "kind": spec.get("kind", "process"),
        "command": spec.get("argv", []),
        "tty": bool(spec.get("tty")),
        "restart": spec.get("restart", "no"),
        "state": status,
        "exit_code": state.get("exit_code"),
        "signal": state.get("signal"),
        "started_at": state.get("started_at", spec.get("created_at")),
        "ended_at": state.get("ended_at"),
        "output_bytes": output_bytes,
        "restarts": state.get("restarts", 0),
        "pid": state.get("pid") if status == "running" else None,
    }


# ---- the supervisor ----


class Supervisor:
    """Owns one session's process: its output, its stdin, restarts and the control socket."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.spec = read_json(directory / SPEC)
        self.sel = selectors.DefaultSelector()
        self.log = BoundedLog(directory / OUTPUT, int(self.spec.get("log_max_bytes", 64 << 20)))
        self.child: execs.Child | None = None
        self.outputs: set[int] = set()
        self.stdin = bytearray()
        self.stdin_eof = False
        # Our own duplicate of the process's stdin: a pty's single fd is also an output, and a selector takes
        # each fd once.
        self.stdin_fd: int | None = None
        self.clients: dict[socket.socket, bytearray] = {}
        self.watchers: set[socket.socket] = set()
        self.stopping = False
        self.kill_at: float | None = None
        self.restart_at: float | None = None
        self.backoff = 1.0
        self.child_started = 0.0
        self.state: dict[str, Any] = {
            "state": "running",
            "restarts": 0,
            "started_at": time.time(),
            "supervisor_pid": os.getpid(),
        }

    def exec_spec(self) -> execs.ExecSpec:
        s = self.spec
        return execs.ExecSpec(
            list(s["argv"]), dict(s.get("env") or {}), s.get("cwd"), s.get("user"), bool(s.get("tty")),
            int(s.get("rows", 24)), int(s.get("cols", 80)),
        )  # fmt: skip

    def spawn(self) -> None:
        """Start (or restart) the process."""
        self.child = execs.spawn(self.exec_spec())
        self.child_started = time.monotonic()
        self.outputs = {fd for _, fd in self.child.outputs()}
        for fd in self.outputs:
            self.sel.register(fd, selectors.EVENT_READ, "out")
        self.stdin_eof = False
        self.stdin_fd = os.dup(self.child.stdin_fd) if self.child.stdin_fd is not None else None
        self.state.update(pid=self.child.proc.pid, exit_code=None, signal=None)
        self.save()

    def save(self) -> None:
        write_json(self.dir / STATE, self.state)

    def listen(self) -> socket.socket:
        path = self.dir / CONTROL
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, "listen")
        return sock

    # -- output and input

    def read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""  # a pty whose other side is gone
        if not data:
            self.sel.unregister(fd)
            self.outputs.discard(fd)
            return
        self.log.append(data)
        for w in list(self.watchers):
            try:
                w.send(b".", socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass  # it has a wake-up pending already
            except OSError:
                self.drop_client(w)

    def drain_outputs(self) -> None:
        """Take what the exited process left in its pipes (a background child may hold them open: no waiting)."""
        for fd in list(self.outputs):
            while fd in self.outputs:
                before = self.log.end
                self.read_output(fd)
                if self.log.end == before:
                    break
        for fd in list(self.outputs):
            self.sel.unregister(fd)
        self.outputs.clear()

    def flush_stdin(self) -> None:
        fd = self.stdin_fd
        if fd is None:
            self.stdin.clear()
            return
        while self.stdin:
            try:
                n = os.write(fd, self.stdin)
            except BlockingIOError:
                break
            except OSError:
                self.stdin.clear()  # the process closed its stdin
                break
            del self.stdin[:n]
        if not self.stdin and self.stdin_eof:
            self.close_stdin()

    def close_stdin(self) -> None:
        """End of input: close the pipe (every copy of it), or type the EOF character on a terminal."""
        if self.stdin_fd is None or self.child is None:
            return
        self.unwatch_stdin()
        if self.spec.get("tty"):
            with contextlib.suppress(OSError):
                os.write(self.stdin_fd, b"\x04")
            return
        os.close(self.stdin_fd)
        self.stdin_fd = None
        self.child.close_stdin()

    def unwatch_stdin(self) -> None:
        if self.stdin_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.stdin_fd)

    # -- control socket

    def accept(self, sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = sock.accept()
            conn.setblocking(False)
            self.clients[conn] = bytearray()
            self.sel.register(conn, selectors.EVENT_READ, "client")

    def drop_client(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        self.watchers.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        conn.close()

    def read_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop_client(conn)
            return
        buf = self.clients[conn]
        buf += data
        if len(buf) > 4 * MAX_PENDING_STDIN:
            self.drop_client(conn)
            return
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                reply = self.handle(conn, json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"ok": False, "error": str(exc)}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                self.drop_client(conn)
                return

    def handle(self, conn: socket.socket, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        child = self.child
        if op == "watch":
            self.watchers.add(conn)
        elif op == "input":
            data = base64.b64decode(req.get("data", ""))
            if len(self.stdin) + len(data) > MAX_PENDING_STDIN:
                return {"ok": False, "error": "the process is not reading its input (buffer full)"}
            self.stdin += data
            self.stdin_eof = self.stdin_eof or bool(req.get("eof"))
            self.flush_stdin()
        elif op == "resize":
            if child is not None:
                child.resize(int(req["rows"]), int(req["cols"]))
            self.spec.update(rows=int(req["rows"]), cols=int(req["cols"]))
        elif op == "signal":
            if child is not None:
                child.signal(int(req["signal"]))
        elif op == "stop":
            self.stopping = True
            self.restart_at = None
            if child is not None:
                child.signal(int(req.get("signal", signal.SIGTERM)))
                self.kill_at = time.monotonic() + float(req.get("timeout", 10.0))
            else:  # waiting to restart: there is nothing to stop but the waiting
                self.state.update(state="exited", ended_at=time.time())
                self.save()
        else:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True}

    # -- the process's end

    def reap(self) -> None:
        child = self.child
        if child is None or child.proc.poll() is None:
            return
        rc = child.proc.returncode
        self.drain_outputs()
        self.unwatch_stdin()
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None
        self.stdin.clear()
        with contextlib.suppress(OSError):
            child.close_fds()
        self.child, self.kill_at = None, None
        exit_code, sig = (rc, None) if rc >= 0 else (None, -rc)
        self.state.update(pid=None, exit_code=exit_code, signal=sig)
        policy = self.spec.get("restart", "no")
        failed = exit_code != 0
        if not self.stopping and (policy == "always" or (policy == "on-failure" and failed)):
            if time.monotonic() - self.child_started > BACKOFF_RESET_AFTER:
                self.backoff = 1.0
            self.restart_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            self.save()
            return
        self.state.update(state="exited", ended_at=time.time())
        self.save()

    def run(self, sigchld_fd: int) -> None:
        """The event loop: until the process is gone for good."""
        listener = self.listen()
        self.sel.register(sigchld_fd, selectors.EVENT_READ, "sigchld")
        while self.state["state"] == "running":
            deadline = min(t for t in (self.kill_at, self.restart_at, time.monotonic() + 3600) if t is not None)
            if self.stdin and self.stdin_fd is not None:
                with contextlib.suppress(KeyError):
                    self.sel.register(self.stdin_fd, selectors.EVENT_WRITE, "stdin")
            for key, _ in self.sel.select(max(0.0, deadline - time.monotonic())):
                if key.data == "out":
                    self.read_output(key.fd)
                elif key.data == "listen":
                    self.accept(listener)
                elif key.data == "client":
                    self.read_client(key.fileobj)  # type: ignore[arg-type]
                elif key.data == "stdin":
                    self.sel.unregister(key.fd)
                    self.flush_stdin()
                elif key.data == "sigchld":
                    with contextlib.suppress(BlockingIOError):
                        os.read(sigchld_fd, 512)
            self.reap()
            now = time.monotonic()
            if self.kill_at is not None and now >= self.kill_at and self.child is not None:
                self.child.signal(signal.SIGKILL)
                self.kill_at = None
            if self.restart_at is not None and now >= self.restart_at:
                self.restart_at = None
                self.state["restarts"] = int(self.state.get("restarts", 0)) + 1
                try:
                    self.spawn()
                except execs.ExecError as exc:
                    self.log.append(f"banger: cannot restart: {exc}\n".encode())
                    self.state.update(state="exited", ended_at=time.time())
                    self.save()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / CONTROL).unlink()
        for conn in list(self.clients):
            self.drop_client(conn)


def supervise(directory: Path) -> int:
    """`sessions.py supervise DIR`: detach, start the process, report {"ok"} or {"error"} on stdout, supervise."""
    if os.fork() > 0:
        return 0  # the agent waits for this first child; the grandchild reports on the inherited stdout
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    report = os.dup(1)
    lockfd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        sup = Supervisor(directory)
        sup.spawn()
    except Exception as exc:
        os.write(report, json.dumps({"ok": False, "error": str(exc) or type(exc).__name__}).encode() + b"\n")
        os._exit(1)
    # From here on nothing may hold the agent's pipe: it waits for EOF on it.
    null = os.open(os.devnull, os.O_RDWR)
    errlog = os.open(directory / SUPERVISOR_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(errlog, 2)
    os.write(report, json.dumps({"ok": True, "pid": os.getpid()}).encode() + b"\n")
    os.close(report)
    try:
        sup.run(wake_r)
    except Exception:
        import traceback

        traceback.print_exc()
        sup.state.update(state="exited", ended_at=time.time())
        sup.save()
        if sup.child is not None:
            sup.child.signal(signal.SIGKILL)
        os._exit(1)
    os._exit(0)


def main(argv: list[str]) -> int:
    """Entry point: `sessions.py supervise DIR`."""
    if len(argv) != 2 or argv[0] != "supervise":
        print("usage: sessions.py supervise DIR", file=sys.stderr)
        return 2
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    return supervise(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
