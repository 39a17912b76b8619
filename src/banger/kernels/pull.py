"""`kernel pull`: stream a catalog bundle over HTTP(S), verify it, unpack it safely, install it atomically.

The download runs on the event loop (so cancelling the task stops it at once, even while the server stalls).
zstd decoding and tar extraction run in two worker threads joined by bounded in-memory pipes, like
`curl | zstd -d | tar -x`, so the loop is never blocked. The sha256 is computed on the loop over the
compressed bytes as they arrive; the decoder thread walks the zstd frame structure over the same bytes. After
the tar ends the workers drain the rest, so the hash covers the whole file and a truncated frame is caught.
Everything lands in a temp dir beside the target, renamed into place only when complete and verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import zstandard

from banger.errors import AlreadyExistsError, DownloadError, IntegrityError, UnsafeArchiveError
from banger.fsutil import temp_sibling_dir
from banger.kernels.bulkhttp import BulkTransport, tls_context
from banger.kernels.catalog import CatalogEntry
from banger.kernels.localops import build_manifest, install_dir, kernel_lock
from banger.kernels.manifest import VMLINUX, KernelManifest
from banger.kernels.safetar import COPY_BUFSIZE, ForwardReader, check_layout, extract_tar_stream, unpacked_limit
from banger.names import validate_name
from banger.progress import Progress, ProgressEvent, no_progress

PIPE_BYTES = 8 << 20
_TIMEOUT = httpx.Timeout(30.0, read=60.0)
_PROGRESS_EVERY_S = 0.1


class _Aborted(Exception):
    """The other side of the pipe gave up."""


class _Pipe:
    """A bounded byte queue between the event loop or a thread (producers) and a thread (consumer).

    Both sides are woken in batches: the consumer once `batch` bytes wait (or at end of file), the producer once
    `batch` bytes of room are free. Waking per 64 KiB network chunk would bounce the GIL between threads
    a thousand times per 64 MB.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_bytes: int = PIPE_BYTES, batch: int = 1) -> None:
        self._loop = loop
        self._max = max_bytes
        self._batch = batch
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._bytes = 0
        self._eof = False
        self._aborted = False
        self._loop_waiting = False
        self._space = asyncio.Event()

    async def put(self, data: bytes) -> None:
        """Queue `data` from the event loop, waiting (without blocking the loop) while the pipe is full."""
        while True:
            with self._cond:
                if self._aborted:
                    raise _Aborted
                if self._bytes < self._max:
                    self._append(data)
                    return
                self._loop_waiting = True
                self._space.clear()
            await self._space.wait()

    def put_blocking(self, data: bytes) -> None:
        """Queue `data` from a thread, blocking while the pipe is full."""
        with self._cond:
            while self._bytes >= self._max and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise _Aborted
            self._append(data)

    def _append(self, data: bytes) -> None:
        self._chunks.append(data)
        self._bytes += len(data)
        if self._bytes >= self._batch:
            self._cond.notify_all()

    def finish(self) -> None:
        """No more data: the consumer sees end of file once the queue is empty."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Stop both sides (any thread may call it); their next call raises _Aborted."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._cond.notify_all()
        self._loop.call_soon_threadsafe(self._space.set)

    def read(self, size: int = -1, /) -> bytes:
        """The next queued chunk, cut to `size` (b"" only at end of file); blocks until one arrives."""
        with self._cond:
            if not self._chunks:
                while self._bytes < self._batch and not self._eof and not self._aborted:
                    self._cond.wait()
            if self._aborted:
                raise _Aborted
            chunk = self._chunks.popleft() if self._chunks else b""
            if 0 <= size < len(chunk):
                self._chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            self._bytes -= len(chunk)
            if self._bytes > self._max - self._batch:
                return chunk
            self._cond.notify_all()
            if self._loop_waiting:
                self._loop_waiting = False
                self._loop.call_soon_threadsafe(self._space.set)
        return chunk


class ZstdFrameWalker:
    """Follows zstd frame and block headers over compressed bytes, so a truncated stream is detected.

    The decompressor just stops at the end of its input; walking the block headers (a few per 128 KiB) tells
    whether the last frame really ended.
    """

    _MAGIC, _DESCRIPTOR, _HEADER_REST, _BLOCK, _CHECKSUM, _SKIP_SIZE = range(6)
    _ZSTD_MAGIC = 0xFD2FB528
    _SKIPPABLE = 0x184D2A50

    def __init__(self) -> None:
        self._state = self._MAGIC
        self._need = 4
        self._hdr = bytearray()
        self._skip = 0
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        """Consume the next compressed bytes; IntegrityError on something that is not zstd."""
        i, n = 0, len(data)
        view = memoryview(data)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._hdr), n - i)
            self._hdr += view[i : i + k]
            i += k
            if len(self._hdr) == self._need:
                header = bytes(self._hdr)
                self._hdr.clear()
                self._advance(header)

    def _expect(self, state: int, need: int) -> None:
        self._state, self._need = state, need

    def _advance(self, h: bytes) -> None:
        value = int.from_bytes(h, "little")
        if self._state == self._MAGIC:
            if value == self._ZSTD_MAGIC:
                self._expect(self._DESCRIPTOR, 1)
            elif value & 0xFFFFFFF0 == self._SKIPPABLE:
                self._expect(self._SKIP_SIZE, 4)
            else:
                raise IntegrityError("bundle is not zstd data (bad frame magic)")
        elif self._state == self._DESCRIPTOR:
            single = bool(value & 0x20)
            if value & 0x08:
                raise IntegrityError("bundle has a corrupt zstd frame header")
            self._checksum = bool(value & 0x04)
            rest = (0 if single else 1) + (0, 1, 2, 4)[value & 3] + ((1 if single else 0), 2, 4, 8)[value >> 6]
            self._expect(self._HEADER_REST, rest) if rest else self._expect(self._BLOCK, 3)
        elif self._state == self._HEADER_REST:
            self._expect(self._BLOCK, 3)
        elif self._state == self._BLOCK:
            block_type = (value >> 1) & 3
            if block_type == 3:
                raise IntegrityError("bundle has a corrupt zstd block")
            self._skip = 1 if block_type == 1 else value >> 3
            if not value & 1:
                self._expect(self._BLOCK, 3)
            elif self._checksum:
                self._expect(self._CHECKSUM, 4)
            else:
                self.frames += 1
                self._expect(self._MAGIC, 4)
        elif self._state == self._CHECKSUM:
            self.frames += 1
            self._expect(self._MAGIC, 4)
        else:  # skippable frame size
            self._skip = value
            self._expect(self._MAGIC, 4)

    def finish(self) -> None:
        """IntegrityError unless the bytes fed so far end exactly at the end of a frame."""
        if self._state != self._MAGIC or self._hdr or self._skip or not self.frames:
            raise IntegrityError("bundle is truncated: its zstd frame is incomplete")


class _WalkedSource:
    """The compressed pipe as the decoder's source, with the frame structure walked on the way (in its thread)."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self.walker = ZstdFrameWalker()

    def read(self, size: int = -1, /) -> bytes:
        data = self._pipe.read(size)
        self.walker.feed(data)
        return data


class _ChunkHasher:
    """sha256 of chunks handed over by one thread, computed in a thread of its own.

    hashlib drops the GIL while it hashes, so hashing vmlinux overlaps with writing it; hashing the file once it
    is on disk would read it back and, since vmlinux sorts last in a bundle, add that time to the end of the pull.
    """

    def __init__(self, name: str) -> None:
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[memoryview | None] = queue.Queue(maxsize=8)  # at most 8 decoded chunks held
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def feed(self, chunk: memoryview) -> None:
        """Queue the next chunk (a view of immutable bytes); blocks while 8 are waiting."""
        self._queue.put(chunk)

    def close(self) -> None:
        """No more chunks; the thread ends once it has hashed those queued (idempotent, one caller at a time)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def hexdigest(self) -> str:
        """The digest of every chunk fed, once close() has been called."""
        if self._thread.ident is not None:
            self._thread.join()
        return self._sha.hexdigest()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._sha.update(chunk)


class _Unpacker:
    """Two worker threads: one zstd-decodes the downloaded bytes, the other extracts the tar into `dest` (and hands
    vmlinux's bytes to a third, which hashes them).

    Decoding in its own thread (zstd releases the GIL) overlaps it with the file writes, as `zstd | tar` does.
    """

    def __init__(self, compressed: _Pipe, dest: Path, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self._compressed = compressed
        self._decoded = _Pipe(loop)
        self._dest = dest
        self._limit = limit
        self._loop = loop
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._running = 2
        self._stopped = False
        self._vmlinux = _ChunkHasher(f"sha256:{dest.name}")
        self._vmlinux_seen = False
        self.vmlinux_sha256: str | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._decode,), name=f"zstd:{dest.name}", daemon=True),
            threading.Thread(target=self._guard, args=(self._extract,), name=f"untar:{dest.name}", daemon=True),
        ]

    def start(self) -> None:
        self._vmlinux.start()
        for thread in self._threads:
            thread.start()

    def _decode(self) -> None:
        source = _WalkedSource(self._compressed)
        total = 0
        try:
            dctx = zstandard.ZstdDecompressor()
            # zstandard only needs .read(n) from its source.
            reader: Any = source
            with dctx.stream_reader(reader, read_size=COPY_BUFSIZE, read_across_frames=True, closefd=False) as zr:
                while chunk := zr.read(COPY_BUFSIZE):
                    total += len(chunk)
                    if total > self._limit:
                        raise UnsafeArchiveError(f"bundle decompresses to more than {self._limit} bytes; refusing it")
                    self._decoded.put_blocking(chunk)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"bundle is not valid zstd data: {exc}") from exc
        if source.read(COPY_BUFSIZE):
            raise IntegrityError("bundle has data after the end of its zstd stream")
        source.walker.finish()
        self._decoded.finish()

    def _extract(self) -> None:
        reader = ForwardReader(self._decoded, self._limit)
        try:
            # vmlinux is a regular file and never a duplicate (the member policy), so its bytes as written are
            # the file's, and they are hashed on the way to disk.
            extract_tar_stream(
                reader,
                self._dest,
                limit=self._limit,
                on_extracted=self._on_extracted,
                taps={VMLINUX: self._vmlinux.feed},
            )
            reader.drain()  # to the end, so the decoder has checked every byte
        finally:
            self._vmlinux.close()
        if self._vmlinux_seen:
            self.vmlinux_sha256 = self._vmlinux.hexdigest()

    def _on_extracted(self, name: str) -> None:
        if name == VMLINUX:
            self._vmlinux_seen = True
            self._vmlinux.close()

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except _Aborted:
            pass  # another side failed or the pull was stopped; that side holds the error
        except BaseException as exc:
            with self._lock:
                self._error = self._error or exc
            self._compressed.abort()
            self._decoded.abort()
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        if self._stopped or self.done.done():
            return
        if self._error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(self._error)

    def stop(self) -> None:
        """Abort and wait for the threads; they block only on the pipes (woken here) or on short disk writes."""
        self._stopped = True
        self._compressed.abort()
        self._decoded.abort()
        for thread in self._threads:
            thread.join()
        self._vmlinux.close()  # the untar thread has ended: nothing else feeds or closes it now
        self._vmlinux.hexdigest()  # joins its thread


@contextlib.asynccontextmanager
async def _open_source(url: str) -> AsyncIterator[tuple[int | None, AsyncIterator[bytes]]]:
    """(length if known, chunks) of the bundle at an http(s) or file:// URL."""
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        try:
            f = path.open("rb")
        except OSError as exc:
            raise DownloadError(f"cannot read {url}: {exc.strerror}") from exc
        with f:
            yield os.fstat(f.fileno()).st_size, _file_chunks(f)
        return
    async with httpx.AsyncClient(
        transport=BulkTransport(tls_context()), timeout=_TIMEOUT, follow_redirects=True
    ) as client:
        async with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as resp:
            if resp.status_code != 200:
                raise DownloadError(f"download of {url} failed: HTTP {resp.status_code} {resp.reason_phrase}")
            length = resp.headers.get("content-length")
            yield (int(length) if length and length.isdigit() else None), resp.aiter_raw()


async def _file_chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(f.read, COPY_BUFSIZE):
        yield chunk


async def _download(entry: CatalogEntry, pipe: _Pipe, progress: Progress) -> tuple[str, int]:
    url = entry.tarball_url
    limit = unpacked_limit(entry.size_bytes)
    sha = hashlib.sha256()
    done = 0
    step = f"downloading {entry.name}"
    try:
        async with _open_source(url) as (length, chunks):
            total = length if length is not None else entry.size_bytes
            progress(ProgressEvent(step=step, done=0, total=total, unit="B"))
            last = time.monotonic()
            async for chunk in chunks:
                sha.update(chunk)
                done += len(chunk)
                if done > limit:
                    raise DownloadError(f"download of {url} exceeds {limit} bytes; refusing it")
                await pipe.put(chunk)  # _Aborted here means the unpacker failed; pull_kernel reports its error
                now = time.monotonic()
                if now - last >= _PROGRESS_EVERY_S:
                    last = now
                    progress(ProgressEvent(step=step, done=done, total=total, unit="B"))
            progress(ProgressEvent(step=step, done=done, total=total, unit="B"))
    except httpx.HTTPError as exc:
        raise DownloadError(f"download of {url} failed after {done} bytes: {exc or type(exc).__name__}") from exc
    pipe.finish()
    return sha.hexdigest(), done


async def pull_kernel(
    entry: CatalogEntry,
    kernels_dir: Path,
    *,
    force: bool = False,
    progress: Progress = no_progress,
    wait: bool = True,
) -> KernelManifest:
    """Download, verify and install the catalog kernel `entry` as `<kernels_dir>/<entry.name>`."""
    validate_name(entry.name, "kernel name")
    target = kernels_dir / entry.name
    limit = unpacked_limit(entry.size_bytes)
    async with kernel_lock(kernels_dir, entry.name, wait=wait):
        if target.exists() and not force:
            raise AlreadyExistsError(f"kernel {entry.name!r} is already installed", hint="use --force to replace it")
        with temp_sibling_dir(target, "pull") as staging:
            loop = asyncio.get_running_loop()
            pipe = _Pipe(loop, batch=COPY_BUFSIZE)
            unpacker = _Unpacker(pipe, staging, limit, loop)
            unpacker.start()
            download = asyncio.create_task(_download(entry, pipe, progress))
            try:
                # A refused bundle must fail the pull at once, even if the server then stalls.
                both: list[asyncio.Future[Any]] = [download, unpacker.done]
                await asyncio.wait(both, return_when=asyncio.FIRST_EXCEPTION)
                if download.done() and isinstance(download.exception(), _Aborted):
                    await unpacker.done  # the unpacker failed and aborted the pipe: raise its error
                if unpacker.done.done() and (error := unpacker.done.exception()) is not None:
                    raise error
                digest, size = await download
                await unpacker.done
            finally:
                download.cancel()
                await asyncio.wait([download])
                if not download.cancelled():
                    download.exception()  # retrieved: the unpacker's error is the one that explains the failure
                unpacker.stop()
            if digest != entry.tarball_sha256:
                raise IntegrityError(
                    f"sha256 mismatch for {entry.tarball_url}: expected {entry.tarball_sha256}, got {digest}"
                    f" ({size} bytes)"
                )
            check_layout(staging)
            progress(ProgressEvent(step="verifying vmlinux", unit="B"))
            manifest = await asyncio.to_thread(
                build_manifest,
                staging,
                name=entry.name,
                distro=entry.distro,
                arch=entry.arch,
                kernel_version=entry.kernel_version,
                source=f"pull:{entry.tarball_url}",
                vmlinux_sha256=unpacker.vmlinux_sha256,
            )
            manifest.write(staging)
            await install_dir(staging, target)
    return manifest
