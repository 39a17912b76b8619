"""File transfer helpers shared by host and guest (stdlib only: ships on the seed drive beside protocol.py).

A transfer is a POSIX tar stream (PAX) whose single top-level entry is named ROOT, carried in DATA frames. Tar is
produced and consumed by a worker thread through the two pipe classes below, which bridge to the event loop.
Extraction assumes the sender may be hostile (the host reads tars made by the guest): names must stay under ROOT,
nothing is written through symlinks, devices are refused, and the result appears at its destination by rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import queue
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from banger.guest.protocol import MAX_CHUNK
else:  # run from the seed drive, where the guest modules are plain siblings
    from protocol import MAX_CHUNK

ROOT = "root"
_ABORT = object()


class TransferError(Exception):
    """A tar stream was unsafe or could not be applied."""


class InboundPipe(io.RawIOBase):
    """A blocking, readable file for a worker thread, fed with chunks from the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_consumed: Callable[[int], None]) -> None:
        super().__init__()
        self._loop = loop
        self._on_consumed = on_consumed
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._buf = b""
        self._chunk_len = 0
        self._eof = False

    def feed(self, data: bytes) -> None:
        """Loop side: queue a chunk for the reader thread."""
        self._queue.put(data)

    def feed_eof(self) -> None:
        """Loop side: no more chunks."""
        self._queue.put(None)

    def abort(self) -> None:
        """Loop side: make the reader thread fail."""
        self._queue.put(_ABORT)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        if not self._buf and not self._eof:
            item = self._queue.get()
            if item is _ABORT:
                raise TransferError("transfer aborted")
            if item is None:
                self._eof = True
            else:
                assert isinstance(item, bytes)
                self._buf = item
                self._chunk_len = len(item)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        if n and not self._buf:
            # ACK whole chunks: tarfile reads 512-byte blocks and one ACK per block would flood the link.
            self._loop.call_soon_threadsafe(self._on_consumed, self._chunk_len)
        return n


class OutboundPipe(io.RawIOBase):
    """A blocking, writable file for a worker thread whose bytes are sent by the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[bytes], Coroutine[Any, Any, bool]]) -> None:
        super().__init__()
        self._loop = loop
        self._send = send
        self._buf = bytearray()
        self._aborted = False

    def abort(self) -> None:
        """Any thread: make every further write fail at once."""
        self._aborted = True

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buf += b
        while len(self._buf) >= MAX_CHUNK:
            self._push(bytes(self._buf[:MAX_CHUNK]))
            del self._buf[:MAX_CHUNK]
        return len(b)

    def flush(self) -> None:
        if self._buf:
            self._push(bytes(self._buf))
            self._buf.clear()

    def _push(self, chunk: bytes) -> None:
        if self._aborted:
            raise BrokenPipeError("transfer aborted")
        if not asyncio.run_coroutine_threadsafe(self._send(chunk), self._loop).result():
            raise BrokenPipeError("transfer stream closed")


def write_tar(path: Path, out: io.RawIOBase) -> None:
    """Write `path` (file, directory or symlink) as a tar stream whose top entry is ROOT."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        tf.add(str(path), arcname=ROOT, recursive=True)
    out.flush()


def transfer_target(dest: Path, name: str) -> Path:
    """Where a transfer of something called `name` lands: inside `dest` if it is a directory (like cp)."""
    return dest / name if dest.is_dir() and name else dest


def _checked_name(name: str) -> str:
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or parts[0] != ROOT:
        raise TransferError(f"refusing tar member outside the transfer: {name!r}")
    return os.path.normpath(name)


def _inside(base: str, path: str) -> bool:
    return os.path.commonpath([base, path]) == base


class _Extractor:
    def __init__(self, tmp: str, keep_owner: bool) -> None:
        self.tmp = os.path.realpath(tmp)
        self.keep_owner = keep_owner
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _checked_name(member.name)
        target = os.path.join(self.tmp, name)
        if not _inside(self.tmp, os.path.realpath(os.path.dirname(target))):
            raise TransferError(f"refusing tar member behind a symlink: {member.name!r}")
        if member.isdev():
            raise TransferError(f"refusing device node in transfer: {member.name!r}")
        if member.islnk():
            link = os.path.join(self.tmp, _checked_name(member.linkname))
            if not _inside(self.tmp, os.path.realpath(link)):
                raise TransferError(f"refusing hard link outside the transfer: {member.name!r}")
            member.linkname = _checked_name(member.linkname)
        member.mode &= 0o7777 if self.keep_owner else 0o1777
        if not self.keep_owner:
            member.uid, member.gid, member.uname, member.gname = os.geteuid(), os.getegid(), "", ""
        if os.path.lexists(target) and not os.path.isdir(target):
            os.unlink(target)  # never write through a symlink an earlier member planted
        if member.isdir():
            # Final modes come last, so a read-only directory can still receive its children.
            self.dirs.append((target, member))
            os.makedirs(target, mode=0o700, exist_ok=True)
            return
        kwargs = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tf.extract(member, self.tmp, set_attrs=True, numeric_owner=True, **kwargs)  # type: ignore[arg-type]

    def finish(self) -> None:
        for target, member in reversed(self.dirs):
            if self.keep_owner and os.geteuid() == 0:
                os.chown(target, member.uid, member.gid)
            os.chmod(target, member.mode)
            os.utime(target, (member.mtime, member.mtime))


def extract_tar(src: io.RawIOBase, target: Path, *, keep_owner: bool, owner: tuple[int, int] | None = None) -> None:
    """Read a transfer tar from `src` and make its ROOT appear at `target` (owned by `owner` if given)."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.banger-", dir=parent)
    try:
        ex = _Extractor(tmp, keep_owner)
        with tarfile.open(fileobj=src, mode="r|") as tf:
            for member in tf:
                ex.add(tf, member)
        ex.finish()
        staged = os.path.join(tmp, ROOT)
        if not os.path.lexists(staged):
            raise TransferError("transfer carried nothing")
        if owner is not None:
            _chown_tree(staged, *owner)
        _replace(staged, target, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _chown_tree(root: str, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _replace(staged: str, target: Path, tmp: str) -> None:
    st = os.lstat(target) if os.path.lexists(target) else None
    if st is None or not stat.S_ISDIR(st.st_mode):
        os.replace(staged, target)
        return
    # rename(2) cannot replace a non-empty directory: move the old one into our temp dir, which is then removed.
    os.rename(target, os.path.join(tmp, "old"))
    try:
        os.rename(staged, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(os.path.join(tmp, "old"), target)
        raise
