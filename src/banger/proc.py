"""The one choke point through which banger runs other programs: argument lists, logged, clean errors."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from banger.errors import ToolError

log = logging.getLogger("banger.proc")

StrPath = str | os.PathLike[str]


def which(tool: str, *, hint: str | None = None) -> str:
    """Absolute path of `tool` on PATH (also /usr/sbin and /sbin), or a ToolError naming it."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        raise ToolError(f"required tool {tool!r} not found on PATH", hint=hint)
    return path


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
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
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion; on failure raise ToolError carrying the tool's own stderr."""
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=_env(env),
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            timeout=timeout,
            check=False,
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
