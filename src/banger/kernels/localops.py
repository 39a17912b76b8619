"""Kernel operations on the local disk: the per-name lock, manifests, import, bundle writing and removal."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import io
import os
import platform
import re
import secrets
import shutil
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from banger.errors import AlreadyExistsError, BusyError, InvalidInputError, NotFoundError, UnsafeArchiveError
from banger.fsutil import dir_size, sha256_file, temp_sibling_dir
from banger.kernels.manifest import CMDLINE, CONFIG, INITRD, MANIFEST, MODULES, VMLINUX, KernelManifest
from banger.kernels.safetar import COPY_BUFSIZE, check_layout, check_symlink_target
from banger.kernels.vmlinux import has_pvh_note, is_elf, read_kernel_version
from banger.names import validate_name
from banger.progress import Progress, ProgressEvent, no_progress

# Polling a non-blocking flock keeps a waiting pull cancellable (a blocking flock in a thread cannot be cancelled).
_LOCK_POLL_S = 0.05
_BUNDLE_MTIME = 0
_BUNDLE_LEVEL = 10
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x03: "i386", 0xF3: "riscv64"}


def _try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        # The holder before us unlinks the file before unlocking; a lock on an unlinked inode guards nothing.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.asynccontextmanager
async def kernel_lock(kernels_dir: Path, name: str, *, wait: bool = True) -> AsyncIterator[None]:
    """Hold the per-kernel lock `<kernels>/.<name>.lock` (across processes); BusyError if taken and not `wait`."""
    kernels_dir.mkdir(parents=True, exist_ok=True)
    path = kernels_dir / f".{name}.lock"
    while (fd := _try_flock(path)) is None:
        if not wait:
            raise BusyError(f"kernel {name!r} is busy: another pull, import or removal holds it")
        await asyncio.sleep(_LOCK_POLL_S)
    try:
        yield
    finally:
        # Unlink while still locked so the kernels dir holds no lock file once we are done.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def elf_arch(vmlinux: Path) -> str | None:
    """The architecture named by an ELF image's e_machine field, or None if unknown."""
    with vmlinux.open("rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return _ELF_MACHINES.get(machine)


def build_manifest(
    kernel_dir: Path,
    *,
    name: str,
    distro: str,
    arch: str,
    kernel_version: str,
    source: str,
    vmlinux_sha256: str | None = None,
) -> KernelManifest:
    """A manifest describing the kernel files in `kernel_dir` (hashes the on-disk vmlinux unless given)."""
    cmdline_path = kernel_dir / CMDLINE
    cmdline = cmdline_path.read_text(errors="replace").strip() if cmdline_path.is_file() else None
    vmlinux = kernel_dir / VMLINUX
    return KernelManifest(
        name=name,
        distro=distro,
        arch=arch,
        kernel_version=kernel_version,
        sha256=vmlinux_sha256 or sha256_file(vmlinux),
        source=source,
        size_bytes=dir_size(kernel_dir) - _size_if_file(kernel_dir / MANIFEST),
        boots_on={"firecracker": is_elf(vmlinux), "qemu-microvm": has_pvh_note(vmlinux)},
        has_initrd=(kernel_dir / INITRD).is_file(),
        has_modules=(kernel_dir / MODULES).is_dir(),
        cmdline=cmdline or None,
    )


def _size_if_file(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


async def install_dir(staging: Path, target: Path) -> None:
    """Move a complete `staging` dir to `target`; an old `target` stays in place until the new one is there."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.parent / f".{target.name}.old.{secrets.token_hex(4)}"
    if _exchange(staging, target):
        os.rename(staging, old)  # staging now holds the previous kernel
    else:
        # No RENAME_EXCHANGE on this filesystem: two renames, with a short window where `target` is absent.
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
    # The new kernel is in place; removing the old one must finish even if the caller is cancelled now.
    await asyncio.shield(asyncio.to_thread(shutil.rmtree, old, True))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the kernel/filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _version_from_modules(kernel_dir: Path) -> str | None:
    modules = kernel_dir / MODULES
    if not modules.is_dir():
        return None
    versions = sorted(p.name for p in modules.iterdir() if p.is_dir() and not p.is_symlink())
    return versions[0] if len(versions) == 1 else None


class _Stopped(Exception):
    """The import was cancelled; the copying thread stops at the next file."""


def _copy_tree(src: Path, dest: Path, rel: str, skipped: list[str], stop: threading.Event) -> None:
    # What a bundle could not carry (symlinks leaving the kernel dir, e.g. build -> /usr/src/..., and special
    # files) is left out and reported, so an imported kernel always survives `bundle` + `pull` unchanged.
    dest.mkdir(mode=0o755)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if stop.is_set():
            raise _Stopped
        out, arcname = dest / entry.name, f"{rel}/{entry.name}"
        if entry.is_symlink():
            target = os.readlink(entry.path)
            try:
                check_symlink_target(arcname, target)
            except UnsafeArchiveError:
                skipped.append(entry.path)
                continue
            os.symlink(target, out)
        elif entry.is_dir():
            _copy_tree(Path(entry.path), out, arcname, skipped, stop)
        elif entry.is_file():
            shutil.copyfile(entry.path, out)
            os.chmod(out, 0o644)
        else:
            skipped.append(entry.path)


def _import_files(source: Path, staging: Path, stop: threading.Event) -> list[str]:
    skipped: list[str] = []
    if source.is_file():
        shutil.copyfile(source, staging / VMLINUX)
        return skipped
    for fname in (VMLINUX, INITRD, CONFIG, CMDLINE):
        if (source / fname).is_file():
            shutil.copyfile(source / fname, staging / fname)
            os.chmod(staging / fname, 0o644)
    if (source / MODULES).is_dir():
        _copy_tree(source / MODULES, staging / MODULES, MODULES, skipped, stop)
    return skipped


async def _copy_in_thread(source: Path, staging: Path) -> list[str]:
    # On cancellation the thread is stopped and awaited, so the staging dir's cleanup never races its writes.
    stop = threading.Event()
    copy = asyncio.ensure_future(asyncio.to_thread(_import_files, source, staging, stop))
    try:
        return await asyncio.shield(copy)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([copy])
        if not copy.cancelled():
            copy.exception()  # _Stopped, expected
        raise


async def import_kernel(
    source: Path,
    kernels_dir: Path,
    *,
    name: str,
    distro: str | None = None,
    kernel_version: str | None = None,
    force: bool = False,
    progress: Progress = no_progress,
    wait: bool = True,
) -> KernelManifest:
    """Install a local kernel (a dir with vmlinux [+config, modules/, initrd.img, cmdline] or a bare vmlinux)."""
    validate_name(name, "kernel name")
    source = source.expanduser().absolute()
    if not source.exists():
        raise NotFoundError(f"{source} does not exist")
    if source.is_dir() and not (source / VMLINUX).is_file():
        raise InvalidInputError(f"{source} has no {VMLINUX} file")
    target = kernels_dir / name
    async with kernel_lock(kernels_dir, name, wait=wait):
        if target.exists() and not force:
            raise AlreadyExistsError(f"kernel {name!r} is already installed", hint="use --force to replace it")
        with temp_sibling_dir(target, "import") as staging:
            progress(ProgressEvent(step=f"copying {source}", unit="B", message=None))
            skipped = await _copy_in_thread(source, staging)
            if skipped:
                left_out = f"left out {len(skipped)} escaping symlink(s) or special file(s): {', '.join(skipped[:3])}"
                progress(ProgressEvent(step="import", message=left_out))
            check_layout(staging)
            vmlinux = staging / VMLINUX
            version = kernel_version or await asyncio.to_thread(read_kernel_version, vmlinux)
            version = version or _version_from_modules(staging) or "unknown"
            manifest = await asyncio.to_thread(
                build_manifest,
                staging,
                name=name,
                distro=distro or "custom",
                arch=elf_arch(vmlinux) or platform.machine(),
                kernel_version=version,
                source=f"import:{source}",
            )
            manifest.write(staging)
            await install_dir(staging, target)
    return manifest


_LEFTOVER = re.compile(r"^\.[a-z0-9-]+\.(pull|import|build|old|rm)\.")


def sweep_leftovers(kernels_dir: Path) -> list[str]:
    """Remove staging and trash dirs a killed daemon left behind (call only when no operation runs)."""
    removed = []
    for entry in kernels_dir.iterdir():
        if _LEFTOVER.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        elif entry.name.startswith(".") and entry.name.endswith(".lock"):
            fd = _try_flock(entry)
            if fd is not None:  # nobody holds it: a leftover of a killed process
                entry.unlink(missing_ok=True)
                os.close(fd)
                removed.append(entry.name)
    return removed


async def remove_kernel_dir(kernels_dir: Path, name: str, *, wait: bool = True) -> None:
    """Delete an installed kernel's directory (renamed aside first, so a half-deleted kernel is never visible)."""
    validate_name(name, "kernel name")
    target = kernels_dir / name
    async with kernel_lock(kernels_dir, name, wait=wait):
        if not target.is_dir():
            raise NotFoundError(f"kernel {name!r} is not installed")
        trash = kernels_dir / f".{name}.rm.{secrets.token_hex(4)}"
        os.rename(target, trash)
        await asyncio.to_thread(shutil.rmtree, trash)


def _bundle_members(kernel_dir: Path) -> Iterator[Path]:
    for fname in (VMLINUX, INITRD, CONFIG, CMDLINE):
        if (kernel_dir / fname).is_file():
            yield kernel_dir / fname
    modules = kernel_dir / MODULES
    if modules.is_dir() and not modules.is_symlink():
        yield modules
        for root, dirs, files in os.walk(modules):
            dirs.sort()
            entries = sorted([*dirs, *files])
            for entry in entries:
                yield Path(root) / entry


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha.update(data)
        self.size += len(data)
        self._out.write(data)
        return len(data)


def _tarinfo(path: Path, arcname: str) -> tarfile.TarInfo | None:
    """A normalized member for `path`, or None for what a pull would refuse (escaping symlinks, special files)."""
    st = path.lstat()
    info = tarfile.TarInfo(arcname)
    info.mtime = _BUNDLE_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        info.mode = 0o777
        try:
            check_symlink_target(arcname, info.linkname)
        except UnsafeArchiveError:
            return None  # e.g. modules/<ver>/build -> /usr/src/...: meaningless in a bundle
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif stat.S_ISREG(st.st_mode):
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o100 else 0o644
    else:
        return None
    return info


def write_bundle(kernel_dir: Path, out: Path) -> tuple[str, int]:
    """Write `kernel_dir` as a deterministic .tar.zst at `out`; returns (sha256, size) of the file written.

    Members are sorted, owned by 0:0 with mtime 0, so the same kernel always gives the same bytes. Symlinks that
    leave the kernel dir and special files are left out: a pull would refuse them.
    """
    check_layout(kernel_dir)
    out = out.absolute()
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        with tmp.open("wb") as raw:
            sink = _HashingWriter(raw)
            cctx = zstandard.ZstdCompressor(level=_BUNDLE_LEVEL, write_checksum=True, threads=-1)
            with cctx.stream_writer(sink, closefd=False) as zw:  # type: ignore[arg-type]  # any .write() works
                with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_BUFSIZE) as tar:
                    for path in _bundle_members(kernel_dir):
                        info = _tarinfo(path, path.relative_to(kernel_dir).as_posix())
                        if info is None:
                            continue
                        if info.isreg():
                            with path.open("rb") as f:
                                tar.addfile(info, f)
                        else:
                            tar.addfile(info)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sink.sha.hexdigest(), sink.size
