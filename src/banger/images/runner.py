"""Running a long bootstrap tool with its output streamed as progress, and its own error lines kept for the error."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from banger.errors import ToolError
from banger.progress import Progress, ProgressEvent

log = logging.getLogger("banger.images")

# apt/mmdebstrap say "E:" / "Err:", apk says "ERROR:", xbps says "ERROR" or "failed"; those lines name the cause,
# which often scrolls out of the last few lines of output (cleanup messages follow it).
_ERROR_LINE = re.compile(r"^(E:|Err:|W:|ERROR)|\berror\b|\bfailed\b|could not|unable to", re.IGNORECASE)
_KEEP_ERRORS = 4
_KEEP_TAIL = 3


def run_streaming(
    argv: Sequence[str],
    *,
    step: str,
    progress: Progress,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> None:
    """Run `argv`, reporting each output line as ProgressEvent(step, message=line); ToolError with its error lines."""
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
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{step}: required tool {argv[0]!r} not found") from exc
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        child.kill()

    timer = threading.Timer(timeout, expire) if timeout else None
    errors: list[str] = []
    tail: deque[str] = deque(maxlen=_KEEP_TAIL)
    try:
        if timer:
            timer.start()
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
        if timer:
            timer.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    tool = Path(argv[0]).name
    if timed_out.is_set():
        raise ToolError(f"{step}: {tool} timed out after {timeout:g}s")
    if returncode != 0:
        shown = errors + [t for t in tail if t not in errors]
        detail = " | ".join(shown) if shown else "(no output)"
        raise ToolError(f"{step}: {tool} exited with {returncode}: {detail}")
