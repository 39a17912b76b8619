"""File transfer helpers shared by host and guest (stdlib only: ships on the seed drive beside protocol.py).

A transfer is a POSIX tar stream (PAX) whose single top-level entry is named ROOT, carried in DATA frames. Tar is
produced and consumed by a worker thread through the two pipe classes below, which bridge to the event loop.
Extraction assumes the sender may be hostile (the host reads tars made by the guest): names must stay under ROOT,
nothing is written through symlinks, devices are refused. The result is staged next to its destination and then
merged into it like `cp -r`: each file replaced by a rename, nothing the transfer does not carry deleted.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import queue
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from banger.guest.protocol import MAX_CHUNK
else:  # run from the seed drive, where the guest modules are plain siblings
    from protocol import MAX_CHUNK

ROOT = "root"
_ABORT = object()
# tarfile's own buffers are 10 KiB (stream) and 16 KiB (file copies); under TCG every pass through its Python
# loops costs, and a copy moves 1 MiB per pass instead. Memory: a few MiB per transfer at most.
COPY_BUF = 1024 * 1024


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

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of the current chunk, handed over without the zero-filled buffer RawIOBase.read
        would allocate (tarfile asks for COPY_BUF at a time and chunks are 32 KiB)."""
        if not self._fill():
            return b""
        n = len(self._buf) if size < 0 else min(size, len(self._buf))
        data, self._buf = (self._buf, b"") if n == len(self._buf) else (self._buf[:n], self._buf[n:])
        self._consumed()
        return data

    def _fill(self) -> bool:
        """Make sure a chunk is at hand; False at end of stream."""
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
        return bool(self._buf)

    def _consumed(self) -> None:
        if not self._buf and self._chunk_len:
            # ACK whole chunks: tarfile reads 512-byte blocks and one ACK per block would flood the link.
            self._loop.call_soon_threadsafe(self._on_consumed, self._chunk_len)
            self._chunk_len = 0

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        if not self._fill():
            return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._consumed()
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
        if len(self._buf) >= MAX_CHUNK:
            whole = len(self._buf) - len(self._buf) % MAX_CHUNK
            view = memoryview(self._buf)
            chunks = [bytes(view[i : i + MAX_CHUNK]) for i in range(0, whole, MAX_CHUNK)]
            view.release()
            del self._buf[:whole]
            self._push(chunks)
        return len(b)

    def flush(self) -> None:
        if self._buf:
            self._push([bytes(self._buf)])
            self._buf.clear()

    def _push(self, chunks: list[bytes]) -> None:
        """Send `chunks` in order from the loop: one hand-over between threads for all of them, not one each."""
        if self._aborted:
            raise BrokenPipeError("transfer aborted")

        async def send_all() -> bool:
            for chunk in chunks:
                if not await self._send(chunk):
                    return False
            return True

        if not asyncio.run_coroutine_threadsafe(send_all(), self._loop).result():
            raise BrokenPipeError("transfer stream closed")


class _Counted:
    """A write-only sink with the tell() tarfile's "w" mode asks for once (it never seeks when writing)."""

    def __init__(self, out: io.RawIOBase) -> None:
        self._out = out
        self._written = 0

    def write(self, b: bytes) -> int:
        view = memoryview(b)
        while view:
            view = view[self._out.write(view) or 0 :]  # a raw sink may take part of it
        self._written += len(b)
        return len(b)

    def tell(self) -> int:
        return self._written

    def read(self, size: int) -> bytes:
        raise io.UnsupportedOperation("write-only")

    def seek(self, pos: int) -> int:
        raise io.UnsupportedOperation("not seekable")

    def close(self) -> None:
        """The caller's sink stays open (tarfile does not close a file it was given, either)."""


def write_tar(path: Path, out: io.RawIOBase) -> None:
    """Write `path` (file, directory or symlink) as a tar stream whose top entry is ROOT."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    # "w", not the stream mode "w|": the stream's buffer is bytes it appends to, so with a large buffer every small
    # member copied it whole, and with the default 10 KiB a large file was cut up by repeated slicing. In "w" mode
    # tarfile writes straight to the pipe, whose bytearray takes appends cheaply and ships whole chunks.
    with tarfile.open(fileobj=_Counted(out), mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.copybufsize = COPY_BUF  # type: ignore[attr-defined]  # a TarFile attribute typeshed does not list
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


def extract_tar(
    src: io.RawIOBase,
    target: Path,
    *,
    keep_owner: bool,
    owner: tuple[int, int] | None = None,
    journal: Any = None,
) -> None:
    """Read a transfer tar from `src` and make its ROOT appear at `target` (owned by `owner` if given).

    `journal` (host side: vms/staging.py) records the staging directory before anything is written into it, so a
    process killed mid-copy has it removed at its next start."""
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.banger-", dir=parent)
    if journal is not None:
        try:
            journal.add(tmp)
        except BaseException:
            os.rmdir(tmp)
            raise
    try:
        ex = _Extractor(tmp, keep_owner)
        with tarfile.open(fileobj=src, mode="r|", bufsize=COPY_BUF) as tf:
            tf.copybufsize = COPY_BUF  # type: ignore[attr-defined]
            for member in tf:
                ex.add(tf, member)
        ex.finish()
        staged = os.path.join(tmp, ROOT)
        if not os.path.lexists(staged):
            raise TransferError("transfer carried nothing")
        if owner is not None:
            _chown_tree(staged, *owner)
        _merge(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if journal is not None:
            journal.remove(tmp)


def _chown_tree(root: str, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _merge(staged: str, target: Path) -> None:
    """Make the staged tree appear at `target` the way `cp -r` does: merge into what is there, delete nothing.

    A path that does not exist yet appears by one rename (a whole new directory at once); onto an existing
    directory each entry is merged in turn, and each file or symlink replaces its namesake by one rename. A
    directory never replaces a non-directory or the other way round: such a conflict is refused before anything
    is moved, so nothing is left half-merged by it.
    """
    conflict = next(_conflicts(staged, str(target)), None)
    if conflict is not None:
        raise TransferError(conflict)
    _apply(staged, str(target))


def _is_dir(path: str) -> bool:
    """A real directory (a symlink to one is not: the merge never follows links in the destination)."""
    return stat.S_ISDIR(os.lstat(path).st_mode)


def _conflicts(src: str, dst: str) -> Iterator[str]:
    if not os.path.lexists(dst):
        return
    if _is_dir(src):
        if not _is_dir(dst):
            yield f"cannot overwrite non-directory {dst} with a directory"
            return
        for name in sorted(os.listdir(src)):
            yield from _conflicts(os.path.join(src, name), os.path.join(dst, name))
    elif _is_dir(dst):
        yield f"cannot overwrite directory {dst} with a non-directory"


def _apply(src: str, dst: str) -> None:
    if os.path.lexists(dst) and _is_dir(src):
        # An existing directory keeps its own mode and owner (as with cp -r); only its entries are merged.
        os.chmod(src, 0o700)  # the staged copy may be read-only; its entries are moved out of it
        for name in sorted(os.listdir(src)):
            _apply(os.path.join(src, name), os.path.join(dst, name))
        return
    try:
        os.replace(src, dst)  # atomic: a reader sees the old entry or the new one, never a partial file
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _replace_across_devices(src, dst)


def _replace_across_devices(src: str, dst: str) -> None:
    """A mount point inside the destination: copy next to `dst` first, then rename there (still atomic)."""
    parent, base = os.path.split(dst)
    tmp = tempfile.mkdtemp(prefix=f".{base}.banger-", dir=parent)
    try:
        staged = os.path.join(tmp, base)
        if _is_dir(src):
            shutil.copytree(src, staged, symlinks=True)
        else:
            shutil.copy2(src, staged, follow_symlinks=False)
        if os.geteuid() == 0:
            st = os.lstat(src)
            os.lchown(staged, st.st_uid, st.st_gid)
        os.replace(staged, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
