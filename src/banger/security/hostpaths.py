"""Host paths named by a caller, read and written with the caller's rights, never the daemon's.

The daemon runs as root; a group member naming `/etc/shadow` in `vm cp` must get what they would get without
banger: "permission denied". So for a non-root caller every such path is touched only by a short-lived
program running as the caller (uid, gid and supplementary groups from SO_PEERCRED): `stat` to learn what the
path is, `cat` or `tar -c` to read it into a private staging directory of the daemon, `tar -x` to write a
result out of one. The handler then works on the staged copy as before; the kernel checks every access the
caller's tools make, so a symlink swapped in between two steps gains the caller nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from banger.errors import InvalidInputError, NotFoundError, PermissionDeniedError, ToolError, UnsafeArchiveError
from banger.security.caller import Caller

log = logging.getLogger("banger.security")

TOOL_TIMEOUT = 3600.0  # a large tree read or written as the caller; the call's cancel kills it sooner
STAT_TIMEOUT = 30.0
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


class Access(StrEnum):
    """What the handler does with a caller-named path."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class PathParam:
    """One parameter of a call that names a host path."""

    param: str
    access: Access


class PathKind(StrEnum):
    """What a caller-named path is, as the caller sees it (symlinks followed)."""

    FILE = "regular file"
    DIRECTORY = "directory"
    MISSING = "missing"
    OTHER = "other"


def _as_caller(caller: Caller) -> dict[str, Any]:
    """Popen arguments that run a child with exactly the caller's ids, a clean environment and cwd /."""
    return {
        "user": caller.uid,
        "group": caller.gid,
        "extra_groups": list(caller.groups),
        "env": CLEAN_ENV,
        "cwd": "/",
        "close_fds": True,
    }


def _denied_or_missing(path: str, stderr: str) -> Exception:
    if "Permission denied" in stderr:
        return PermissionDeniedError(
            f"permission denied: {path} (banger reads and writes host files with your own rights)"
        )
    if "No such file" in stderr or "Not a directory" in stderr:
        return NotFoundError(f"{path} does not exist")
    tail = " | ".join(stderr.strip().splitlines()[-3:]) or "(no output)"
    return ToolError(f"cannot access {path} as uid: {tail}")


def path_kind(caller: Caller, path: str) -> PathKind:
    """What `path` is to the caller; PermissionDeniedError when the caller cannot even look."""
    return _stat(caller, path)[0]


def _stat(caller: Caller, path: str) -> tuple[PathKind, int]:
    """Kind and permission bits of `path` as the caller sees it (symlinks followed)."""
    argv = ["stat", "-L", "-c", "%a %F", "--", path]
    log.debug("as uid %d: %s", caller.uid, shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=STAT_TIMEOUT, **_as_caller(caller))
    if proc.returncode != 0:
        err = _denied_or_missing(path, proc.stderr)
        if isinstance(err, NotFoundError):
            return PathKind.MISSING, 0
        raise err
    mode, _, kind = proc.stdout.strip().partition(" ")
    bits = int(mode, 8) & 0o7777 if mode.isdigit() else 0o644
    if kind in ("regular file", "regular empty file"):
        return PathKind.FILE, bits
    if kind == "directory":
        return PathKind.DIRECTORY, bits
    return PathKind.OTHER, bits


def check_writable(caller: Caller, path: str) -> None:
    """Fail early, before any work, when the caller could not create `path` (or write into it, a directory)."""
    path = _checked_abs(path)
    where = path if path_kind(caller, path) is PathKind.DIRECTORY else (posixpath.dirname(path) or "/")
    kind = path_kind(caller, where)
    if kind is not PathKind.DIRECTORY:
        raise NotFoundError(f"directory {where} does not exist")
    proc = subprocess.run(["test", "-w", where], timeout=STAT_TIMEOUT, **_as_caller(caller))
    if proc.returncode != 0:
        raise PermissionDeniedError(f"permission denied: cannot write to {where} (banger writes host files as you)")


def _checked_abs(path: str) -> str:
    if not os.path.isabs(path):
        raise InvalidInputError(f"host paths must be absolute, got {path!r}")
    return os.path.normpath(path)


class _Reaped:
    """A child running as the caller, killed when the call is cancelled or its time is up."""

    def __init__(self, argv: list[str], caller: Caller, cancel: threading.Event, **popen: Any) -> None:
        log.debug("as uid %d: %s", caller.uid, shlex.join(argv))
        self.argv = argv
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, **_as_caller(caller), **popen)
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._watch, args=(cancel,), daemon=True)
        self._timer.start()
        self.killed = False

    def _watch(self, cancel: threading.Event) -> None:
        waited = 0.0
        while not self._stop.wait(0.2):
            waited += 0.2
            if cancel.is_set() or waited > TOOL_TIMEOUT:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                return

    def finish(self, path: str) -> None:
        """Wait for the child; raise the caller-facing error its stderr stands for."""
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        code = self.proc.wait()
        self._stop.set()
        if self.killed:
            raise ToolError(f"{self.argv[0]} on {path} was stopped (cancelled or over {TOOL_TIMEOUT:.0f}s)")
        if code != 0:
            raise _denied_or_missing(path, err)


def stage_read(caller: Caller, path: str, staging: Path, cancel: threading.Event) -> Path:
    """Copy what the caller can read at `path` into staging/<basename>, read by the caller's own tools."""
    path = _checked_abs(path)
    kind, mode = _stat(caller, path)
    if kind is PathKind.MISSING:
        raise NotFoundError(f"{path} does not exist")
    if kind is PathKind.OTHER:
        raise InvalidInputError(f"{path} is neither a regular file nor a directory")
    target = staging / (posixpath.basename(path) or "root")
    if kind is PathKind.FILE:
        with open(target, "xb") as out:
            child = _Reaped(["cat", "--", path], caller, cancel, stdout=out)
            child.finish(path)
        os.chmod(target, mode & 0o777)  # modes are kept, as a root copy keeps them (never setuid/setgid bits)
        return target
    child = _Reaped(["tar", "-C", path, "-cf", "-", "."], caller, cancel, stdout=subprocess.PIPE)
    try:
        assert child.proc.stdout is not None
        target.mkdir(mode=0o755)
        _extract_plain(child.proc.stdout, target)
    finally:
        if child.proc.stdout is not None:
            child.proc.stdout.close()
        child.finish(path)
    return target


def _member_path(name: str) -> str:
    norm = posixpath.normpath(name)
    if name.startswith("/") or "\0" in name or norm == ".." or norm.startswith("../"):
        raise UnsafeArchiveError(f"unsafe name {name!r} in the caller's tree")
    return norm


def _extract_plain(stream: IO[bytes], target: Path) -> None:
    """Unpack the caller's tar stream: only files, directories, symlinks and in-tree hard links, nothing through
    a symlink, owners and modes kept (the tree is the caller's, it stays theirs in the staging copy)."""
    links: set[str] = set()
    seen: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for member in tf:
            name = _member_path(member.name)
            if name == ".":
                continue
            parts = name.split("/")
            if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                raise UnsafeArchiveError(f"{name!r} lies under a symlink")
            if member.islnk() and _member_path(member.linkname) not in seen:
                raise UnsafeArchiveError(f"hard link {name!r} points outside the tree")
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                continue  # devices, fifos and sockets are not copied (cp without -a does not either)
            member.name = name
            if member.islnk():
                member.linkname = _member_path(member.linkname)
            tf.extract(member, str(target), set_attrs=True, numeric_owner=True)
            seen.add(name)
            if member.issym():
                links.add(name)


def write_out(caller: Caller, staged: Path, dest: str, cancel: threading.Event) -> str:
    """Place the staged file or tree at `dest` (or inside it, when it is a directory) as the caller; returns
    where it landed. Directories merge into existing ones, files are replaced, as `cp -r` does."""
    dest = _checked_abs(dest)
    kind = path_kind(caller, dest)
    if kind is PathKind.DIRECTORY:
        parent, name = dest, staged.name
    else:
        parent, name = posixpath.dirname(dest) or "/", posixpath.basename(dest)
        if path_kind(caller, parent) is not PathKind.DIRECTORY:
            raise NotFoundError(f"directory {parent} does not exist")
    child = _Reaped(["tar", "-C", parent, "-xpf", "-", "--no-same-owner"], caller, cancel, stdin=subprocess.PIPE)
    try:
        assert child.proc.stdin is not None
        with tarfile.open(fileobj=child.proc.stdin, mode="w|") as tf:
            tf.add(str(staged), arcname=name, recursive=True)
    except BrokenPipeError:
        pass  # tar stopped reading; its stderr says why
    finally:
        if child.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                child.proc.stdin.close()
        child.finish(posixpath.join(parent, name))
    return posixpath.join(parent, name)


@contextlib.contextmanager
def staging_dir(root: Path) -> Any:
    """A fresh private directory under root, removed afterwards."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = Path(tempfile.mkdtemp(prefix="stage-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
