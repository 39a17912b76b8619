"""Safe streaming extraction of kernel bundles (tar) into a fresh directory.

A bundle's top level may hold only `vmlinux` (regular file, required), `initrd.img`, `config`, `cmdline`
(regular files) and `modules/` (a directory tree). `tarfile` writes the members, after the checks below and the
"data" extraction filter's mode clean-up (`bundle_modes`). Refused (UnsafeArchiveError, nothing is written for the
offending member):

- absolute member names (the data filter would silently strip the leading "/"), names with NUL bytes, and names
  whose normalized path leaves the target ("..");
- device nodes (character or block), FIFOs, sparse files and any other member type than regular file,
  directory, symlink and hard link. Kernel bundles never need them, and creating them is a privilege problem;
- symlinks with an absolute target, or whose target, resolved from the link's directory, leaves the target, or
  which climb ("..") after descending (the lexical check would not match what the kernel resolves through
  other symlinks);
- hard links to anything but a regular file that appeared earlier in the same bundle;
- member paths that pass through a symlink of the bundle, duplicate names, and names that clash with a directory;
- unexpected top-level names, and `vmlinux`, `initrd.img`, `config`, `cmdline` that are not regular files;
- a decompressed stream larger than the limit (see `unpacked_limit`): declared member sizes are summed before
  anything is written, and the bytes actually read are counted too.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from banger import tarcompat
from banger.errors import IntegrityError, InvalidInputError, UnsafeArchiveError
from banger.kernels.manifest import CMDLINE, CONFIG, INITRD, MODULES, VMLINUX

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

TOP_LEVEL_FILES = frozenset({VMLINUX, INITRD, CONFIG, CMDLINE})
TOP_LEVEL_DIRS = frozenset({MODULES})
COPY_BUFSIZE = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_MIB = 1 << 20
ELF_MAGIC = b"\x7fELF"


def unpacked_limit(size_bytes: int) -> int:
    """Most bytes a bundle of `size_bytes` (compressed) may decompress to: max(8x, size + 64 MiB).

    Kernel trees compress about 3-6x with zstd, so 8x leaves room for honest bundles, and the 64 MiB floor keeps
    tiny catalog sizes from refusing a real kernel; a bomb still stops after at most that much output.
    """
    return max(8 * size_bytes, size_bytes + 64 * _MIB)


class Readable(Protocol):
    """A byte source: `read(n)` returns up to n bytes (more is tolerated), b"" at the end."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to `size` bytes; b"" at the end."""
        ...


class ForwardReader:
    """A forward-only file over a byte source: exact-size reads, tell(), forward seek, and a byte cap.

    tarfile's non-stream mode reads members straight from this object, which avoids the buffer copies of its
    stream mode; it only ever seeks forward when members are visited in order.
    """

    def __init__(self, source: Readable, limit: int) -> None:
        self._source = source
        self._limit = limit
        self._buf = b""
        self._off = 0
        self._pos = 0
        self._pulled = 0
        self.last_read = b""

    def _pull(self, want: int) -> bytes:
        data = self._source.read(max(want, COPY_BUFSIZE))
        self._pulled += len(data)
        if self._pulled > self._limit:
            raise UnsafeArchiveError(f"bundle decompresses to more than {self._limit} bytes; refusing it")
        return data

    def read(self, size: int = -1, /) -> bytes:
        """Exactly `size` bytes, fewer only at the end of the stream."""
        if size < 0:
            raise ValueError("ForwardReader reads need a size")
        avail = len(self._buf) - self._off
        if avail >= size:
            out = self._buf[self._off : self._off + size]
            self._off += size
        else:
            parts = [self._buf[self._off :]] if avail else []
            have = avail
            self._buf, self._off = b"", 0
            while have < size:
                data = self._pull(size - have)
                if not data:
                    break
                need = size - have
                if len(data) > need:
                    self._buf, self._off = data, need
                    data = data[:need]
                parts.append(data)
                have += len(data)
            out = b"".join(parts)
        self._pos += len(out)
        self.last_read = out if len(out) <= _BLOCK else b""
        return out

    def copy_to(self, target: BinaryIO, size: int, tap: Callable[[memoryview], None] | None = None) -> None:
        """Write the next `size` bytes to `target` straight from the decoded chunks (no joins, no copies).

        `tap`, if given, sees each piece after it is written (the pieces are views of immutable bytes).
        """
        remaining = size
        while remaining:
            avail = len(self._buf) - self._off
            if not avail:
                data = self._pull(remaining)
                if not data:
                    raise tarfile.ReadError("unexpected end of data")
                self._buf, self._off, avail = data, 0, len(data)
            n = min(avail, remaining)
            piece = memoryview(self._buf)[self._off : self._off + n]
            target.write(piece)
            if tap is not None:
                tap(piece)
            self._off += n
            self._pos += n
            remaining -= n

    def tell(self) -> int:
        """Bytes consumed so far."""
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        """Skip forward to absolute position `pos` (backwards is an error)."""
        if whence != 0 or pos < self._pos:
            raise tarfile.ReadError("bundle stream cannot seek backwards")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, COPY_BUFSIZE)):
                raise tarfile.ReadError("unexpected end of data")
        return self._pos

    def drain(self) -> int:
        """Read the source to its end (still under the cap); returns how many bytes that was."""
        n = len(self._buf) - self._off
        self._buf, self._off = b"", 0
        while data := self._pull(COPY_BUFSIZE):
            n += len(data)
        return n


def _refuse(name: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"unsafe bundle member {name!r}: {why}; refusing the bundle")


def normalize_member_name(name: str) -> str:
    """The member's path relative to the target ("." for the root), or UnsafeArchiveError if it leaves it."""
    if "\x00" in name:
        raise _refuse(name, "name contains a NUL byte")
    if name.startswith("/"):
        raise _refuse(name, "absolute path")
    norm = posixpath.normpath(name) if name else "."
    if norm == ".." or norm.startswith("../"):
        raise _refuse(name, "path leaves the target directory")
    return norm


def check_symlink_target(name: str, target: str) -> None:
    """Refuse a symlink at normalized `name` whose `target` is absolute, climbs after descending, or escapes."""
    if not target or "\x00" in target:
        raise _refuse(name, "symlink with an empty or NUL-containing target")
    if target.startswith("/"):
        raise _refuse(name, f"symlink to absolute path {target!r}")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    descended = False
    for part in parts:
        if part == "..":
            if descended:
                raise _refuse(name, f"symlink target {target!r} climbs after descending")
        else:
            descended = True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise _refuse(name, f"symlink target {target!r} leaves the target directory")


@dataclass
class MemberPolicy:
    """Tracks what a bundle has shown so far and checks each next member against the rules above."""

    limit: int
    declared: int = 0
    files: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    dirs: set[str] = field(default_factory=set)

    def check(self, member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        """The member with normalized names, None to skip it (the root entry), or UnsafeArchiveError."""
        name = normalize_member_name(member.name)
        if name == ".":
            if member.isdir():
                return None
            raise _refuse(member.name, "non-directory entry for the target directory itself")
        if member.issparse():
            raise _refuse(name, "sparse files are not allowed")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise _refuse(name, "device nodes, FIFOs and other special files are not allowed")
        top, _, rest = name.partition("/")
        if top in TOP_LEVEL_FILES:
            if rest or not member.isreg():
                raise _refuse(name, f"{top} must be a regular file")
        elif top in TOP_LEVEL_DIRS:
            if not rest and not member.isdir():
                raise _refuse(name, f"{top} must be a directory")
        else:
            allowed = ", ".join(sorted(TOP_LEVEL_FILES | TOP_LEVEL_DIRS))
            raise _refuse(name, f"unexpected top-level entry (a bundle holds only {allowed})")
        parents = _parents(name)
        for parent in parents:
            if parent in self.links or parent in self.files:
                raise _refuse(name, f"path passes through non-directory {parent!r}")
        if member.isdir():
            if name in self.files or name in self.links:
                raise _refuse(name, "duplicate entry")
        elif name in self.files or name in self.links or name in self.dirs:
            raise _refuse(name, "duplicate entry or clash with a directory")
        if member.issym():
            check_symlink_target(name, member.linkname)
            self.links.add(name)
        elif member.islnk():
            target = normalize_member_name(member.linkname)
            if target not in self.files:
                raise _refuse(name, f"hard link to {member.linkname!r}, which is not an earlier file of the bundle")
            self.files.add(name)
            self.dirs.update(parents)
            # Link by the checked path, never by a spelling that could walk through a symlink.
            return tarcompat.replace(member, name=name, linkname=target)
        elif member.isreg():
            self.declared += member.size
            if self.declared > self.limit:
                raise UnsafeArchiveError(f"bundle members add up to more than {self.limit} bytes; refusing it")
            self.files.add(name)
        else:
            self.dirs.add(name)
        self.dirs.update(parents)
        return member if member.name == name else tarcompat.replace(member, name=name)


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def bundle_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The data filter's mode clean-up, without its path checks (MemberPolicy has made them, lexically)."""
    # tarfile.data_filter resolves the destination and every member and link target with os.path.realpath: a dozen
    # lstat calls and a few hundred microseconds of Python per member, in the thread that writes the files. The
    # MemberPolicy checks have already refused every name and link that leaves `dest`, and no member path passes
    # through a symlink of the bundle into a fresh private `dest`, so those lookups could find nothing more.
    if member.isdir():
        # The data filter leaves directory modes unset (0700 from mkdir); kernel trees want them world-readable.
        return tarcompat.replace(member, mode=0o755)
    if member.isreg() or member.islnk():
        # As the data filter does: no setuid/setgid/sticky, no group/other write, owner can read and write,
        # and no execute bits unless the owner has one.
        mode = member.mode & 0o755
        if not mode & 0o100:
            mode &= ~0o111
        return member if mode | 0o600 == member.mode else tarcompat.replace(member, mode=mode | 0o600)
    return member  # a symlink (MemberPolicy lets nothing else through); tarfile never chmods those


class _BundleTarFile(tarfile.TarFile):
    """tarfile over a ForwardReader: file data goes straight from decoded chunks to disk."""

    reader: ForwardReader
    taps: Mapping[str, Callable[[memoryview], None]]

    def makefile(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        self.reader.seek(tarinfo.offset_data)
        with open(targetpath, "wb") as target:
            self.reader.copy_to(target, tarinfo.size, self.taps.get(tarinfo.name))

    def chown(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath, numeric_owner: bool) -> None:
        """Ownership is never taken from a bundle: files belong to whoever pulls it."""


def extract_tar_stream(
    reader: ForwardReader,
    dest: Path,
    *,
    limit: int,
    on_extracted: Callable[[str], None] | None = None,
    taps: Mapping[str, Callable[[memoryview], None]] | None = None,
) -> None:
    """Extract the tar read from `reader` into the existing empty directory `dest`, member by member.

    `on_extracted(name)` is called after each member is on disk; `taps[name]` sees the data of the regular file
    `name` as it is written (e.g. to hash vmlinux without reading it back).
    """
    policy = MemberPolicy(limit=limit)
    try:
        tar = _BundleTarFile(fileobj=reader, mode="r", errorlevel=2)  # type: ignore[arg-type]
        tar.reader = reader
        tar.taps = taps or {}
        with tar:
            while (raw := tar.next()) is not None:
                member = policy.check(raw)
                if member is None:
                    continue
                tarcompat.extract(tar, member, str(dest), bundle_modes)
                if on_extracted is not None:
                    on_extracted(member.name)
                # Members are not needed again; dropping them keeps memory flat for large module trees.
                tar.members.clear()  # type: ignore[attr-defined]  # real attribute, not in typeshed
    except tarcompat.FilterError as exc:
        raise UnsafeArchiveError(f"unsafe bundle: {exc}; refusing the bundle") from exc
    except tarfile.TarError as exc:
        raise IntegrityError(f"bundle is not a valid tar archive: {exc}") from exc
    if reader.last_read != bytes(_BLOCK):
        # tarfile stops quietly at a truncated or garbled header; a proper archive ends with a zero block.
        raise IntegrityError("bundle tar archive is truncated or corrupt (no end-of-archive marker)")


def check_layout(kernel_dir: Path) -> None:
    """Require a regular, uncompressed ELF `vmlinux` in `kernel_dir`."""
    vmlinux = kernel_dir / VMLINUX
    if not vmlinux.is_symlink() and not vmlinux.exists():
        raise InvalidInputError(f"no {VMLINUX} in the kernel bundle")
    if vmlinux.is_symlink() or not vmlinux.is_file():
        raise InvalidInputError(f"{VMLINUX} in the kernel bundle is not a regular file")
    with vmlinux.open("rb") as f:
        if f.read(4) != ELF_MAGIC:
            raise InvalidInputError(f"{VMLINUX} is not an uncompressed ELF image (a bzImage or compressed file?)")
