"""The one choke point through which banger runs other programs: argument lists, logged, clean errors."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from banger.errors import CancelledError, ToolError

log = logging.getLogger("banger.proc")

StrPath = str | os.PathLike[str]


def which(tool: str, *, hint: str | None = None) -> str:
    """Absolute path of `tool` on PATH (also /usr/sbin and /sbin), or a ToolError naming it."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        raise ToolError(f"required tool {tool!r} not found on PATH", hint=hint)
    return path


_local = threading.local()

# The bound on any external command run without an explicit timeout: nothing banger runs may hang forever.
DEFAULT_TIMEOUT = 3600.0


@contextlib.contextmanager
def cancel_on(event: threading.Event) -> Iterator[None]:
    """In this block, in this thread, run() kills its child and raises CancelledError once `event` is set.

    Blocking work (a kernel build, say) runs in a worker thread; this lets its external tools stop promptly when
    the daemon-side call is cancelled, without threading an argument through every helper.
    """
    previous = getattr(_local, "cancel", None)
    _local.cancel = event
    try:
        yield
    finally:
        _local.cancel = previous


def _run_cancellable(
    args: list[str], event: threading.Event, input: bytes | None, timeout: float | None, **popen: Any
) -> subprocess.CompletedProcess[bytes]:
    if event.is_set():
        raise CancelledError(f"{Path(args[0]).name} was cancelled before it started")
    child = subprocess.Popen(args, stdin=subprocess.PIPE if input is not None else None, **popen)
    if input is not None and child.stdin is not None:
        # communicate() cannot be retried after a timeout with input still to send: feed stdin ourselves.
        pipe, child.stdin = child.stdin, None
        threading.Thread(target=_feed, args=(pipe, input), daemon=True).start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            out, err = child.communicate(timeout=0.2)
            return subprocess.CompletedProcess(args, child.returncode, out, err)
        except subprocess.TimeoutExpired:
            if event.is_set() or (deadline is not None and time.monotonic() > deadline):
                child.kill()
                child.communicate()
                if event.is_set():
                    raise CancelledError(f"{Path(args[0]).name} was cancelled") from None
                raise subprocess.TimeoutExpired(args, timeout or 0) from None


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    except BrokenPipeError:
        pass  # the child stopped reading; its exit status tells the rest
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _env(extra: Mapping[str, str] | None, inherit: bool = True) -> dict[str, str]:
    env = dict(os.environ) if inherit else {}
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[StrPath],
    *,
    cwd: StrPath | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
    capture: bool = True,
    step: str | None = None,
    timeout: float | None = None,
    inherit_env: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion; on failure raise ToolError carrying the tool's own stderr.

    It is killed after `timeout` seconds (DEFAULT_TIMEOUT when not given), and at once when the `cancel_on`
    event of this thread is set.
    inherit_env=False starts the child from `env` alone (plus LC_ALL), not from this process's environment.
    """
    args = [os.fspath(a) for a in argv]
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    log.debug("run: %s", shlex.join(args))
    streams: dict[str, Any] = {
        "stdout": subprocess.PIPE if capture else None,
        "stderr": subprocess.PIPE if capture else None,
    }
    cancel: threading.Event | None = getattr(_local, "cancel", None)
    try:
        if cancel is not None:
            proc = _run_cancellable(args, cancel, input, timeout, cwd=cwd, env=_env(env, inherit_env), **streams)
        else:
            proc = subprocess.run(
                args, cwd=cwd, env=_env(env, inherit_env), input=input, timeout=timeout, check=False, **streams
            )
    except FileNotFoundError as exc:
        raise ToolError(f"required tool {args[0]!r} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{Path(args[0]).name} timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip().splitlines()[-5:]
        what = f"{step}: " if step else ""
        detail = " | ".join(tail) if tail else "(no output)"
        raise ToolError(f"{what}{Path(args[0]).name} exited with {proc.returncode}: {detail}")
    return proc


def run_text(argv: Sequence[StrPath], **kwargs: object) -> str:
    """Run a command and return its stdout as text."""
    out = run(argv, **kwargs)  # type: ignore[arg-type]
    return out.stdout.decode(errors="replace")
