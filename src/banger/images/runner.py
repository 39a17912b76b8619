"""Running a long bootstrap tool with its output streamed as progress, and its own error lines kept for the error."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from banger.errors import CancelledError, ToolError
from banger.progress import Progress, ProgressEvent

log = logging.getLogger("banger.images")

# apt/mmdebstrap say "E:" / "Err:", apk says "ERROR:", xbps says "ERROR" or "failed"; those lines name the cause,
# which often scrolls out of the last few lines of output (cleanup messages follow it).
_ERROR_LINE = re.compile(r"^(E:|Err:|W:|ERROR)|\berror\b|\bfailed\b|could not|unable to", re.IGNORECASE)
_KEEP_ERRORS = 4
_KEEP_TAIL = 3
_WATCH_INTERVAL = 0.2
_TERM_GRACE = 30.0


def run_streaming(
    argv: Sequence[str],
    *,
    step: str,
    progress: Progress,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Run `argv`, reporting each output line as ProgressEvent(step, message=line); ToolError with its error lines.

    Setting `cancel` kills the tool and raises CancelledError; so does running past `timeout` (as ToolError)."""
    log.debug("run: %s", shlex.join(argv))
    full_env = dict(os.environ)
    full_env.setdefault("LC_ALL", "C.UTF-8")
    full_env.update(env or {})
    try:
        child = subprocess.Popen(
            list(argv),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{step}: required tool {argv[0]!r} not found") from exc
    timed_out = threading.Event()
    finished = threading.Event()
    cancelled = cancel or threading.Event()
    deadline = time.monotonic() + timeout if timeout else None

    def watch() -> None:
        # The reader below blocks on the pipe; this thread is what notices a cancel or the deadline and kills.
        while not finished.wait(_WATCH_INTERVAL):
            if deadline is not None and time.monotonic() > deadline:
                timed_out.set()
            if timed_out.is_set() or cancelled.is_set():
                stop()
                return

    def stop() -> None:
        # SIGTERM first, to the whole group as a terminal's ^C would: mmdebstrap (root mode) has mounts and a
        # tempdir to undo, which SIGKILL would leave behind. Then SIGKILL for stragglers still holding our pipe.
        _signal_group(child, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=_TERM_GRACE)
        _signal_group(child, signal.SIGKILL)

    watcher = threading.Thread(target=watch, name=f"watch-{Path(argv[0]).name}", daemon=True)
    errors: list[str] = []
    tail: deque[str] = deque(maxlen=_KEEP_TAIL)
    try:
        watcher.start()
        for raw in child.stdout or ():
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            tail.append(line)
            if _ERROR_LINE.search(line) and len(errors) < _KEEP_ERRORS:
                errors.append(line)
            progress(ProgressEvent(step=step, message=line))
        returncode = child.wait()
    finally:
        finished.set()
        if child.poll() is None:
            stop()
        watcher.join()
    tool = Path(argv[0]).name
    if cancelled.is_set():
        raise CancelledError(f"{step}: cancelled")
    if timed_out.is_set():
        raise ToolError(f"{step}: {tool} timed out after {timeout:g}s")
    if returncode != 0:
        shown = errors + [t for t in tail if t not in errors]
        detail = " | ".join(shown) if shown else "(no output)"
        raise ToolError(f"{step}: {tool} exited with {returncode}: {detail}")


def _signal_group(child: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, sig)
