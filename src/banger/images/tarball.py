"""Root filesystem tarballs: safe extraction (plain/gz/bz2/xz/zst) into a staging directory, and packing one.

Safety policy, decided for root filesystems rather than for data archives (tarfile's "data" filter would strip
ownership and setuid bits and refuse absolute symlinks, all of which a real rootfs legitimately has):
- member names are made relative (a leading "/" is dropped, as GNU tar does); any ".." component is refused;
- symlinks are kept whatever they point at: they are resolved inside the guest, never on the host;
- nothing is ever written *through* a symlink: a member whose parent path crosses a symlink is refused, and an
  existing non-directory at a member's path is unlinked first (so a later file replaces, never follows, a link);
- hard links must name an earlier member by a path that crosses no symlink;
- character and block device nodes are skipped (the guest mounts devtmpfs; guestside adds /dev/console and
  /dev/null itself); fifos, ownership, modes, setuid bits and extended attributes (SCHILY.xattr, e.g. file
  capabilities) are kept.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

import zstandard

from banger import tarcompat
from banger.errors import CancelledError, UnsafeArchiveError
from banger.progress import Progress, ProgressEvent

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_REPORT_EVERY = 2000
_XATTR_PREFIX = "SCHILY.xattr."
log = logging.getLogger("banger.images")


@contextmanager
def open_tar_stream(path: Path) -> Iterator[tarfile.TarFile]:
    """A streaming TarFile over `path`, whatever its compression (none, gz, bz2, xz or zstd)."""
    with path.open("rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if head == _ZSTD_MAGIC:
            reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw)
            with reader, tarfile.open(fileobj=reader, mode="r|") as tf:
                yield tf
        else:
            try:
                tf = tarfile.open(fileobj=raw, mode="r|*")
            except tarfile.TarError as exc:
                raise UnsafeArchiveError(f"{path}: not a tar archive ({exc})") from exc
            with tf:
                yield tf


def _clean(name: str, what: str) -> str:
    parts = [p for p in PurePosixPath(name.lstrip("/")).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing tar member with '..' in its {what}: {name!r}")
    return "/".join(parts)


class _RootfsFilter:
    """A tarfile extraction filter enforcing the policy in the module docstring; counts members for progress."""

    def __init__(self, dest: Path, progress: Progress, step: str, cancel: threading.Event | None) -> None:
        self.dest = dest
        self.cancel = cancel
        self.progress = progress
        self.step = step
        self.count = 0
        self.skipped_devices = 0
        self._safe_dirs: set[str] = {""}
        self.xattrs: list[tuple[str, dict[str, str]]] = []

    def _check_parents(self, rel: str, name: str) -> None:
        parent = rel.rpartition("/")[0]
        if parent in self._safe_dirs:
            return
        walked = ""
        for part in parent.split("/"):
            walked = f"{walked}/{part}" if walked else part
            if walked in self._safe_dirs:
                continue
            try:
                st = os.lstat(self.dest / walked)
            except FileNotFoundError:
                # Missing parents are created by tarfile as real directories.
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeArchiveError(f"refusing tar member {name!r}: its path goes through a non-directory")
            self._safe_dirs.add(walked)

    def __call__(self, member: tarfile.TarInfo, _dest: str) -> tarfile.TarInfo | None:
        self.count += 1
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError(f"{self.step}: cancelled")
        if self.count % _REPORT_EVERY == 0:
            self.progress(ProgressEvent(step=self.step, done=self.count, unit="files"))
        if member.ischr() or member.isblk():
            self.skipped_devices += 1
            return None
        rel = _clean(member.name, "name")
        if not rel:
            return None
        self._check_parents(rel, member.name)
        changes: dict[str, str] = {"name": rel}
        if member.islnk():
            target = _clean(member.linkname, "link target")
            self._check_parents(target, member.linkname)
            changes["linkname"] = target
        target_path = self.dest / rel
        try:
            st = os.lstat(target_path)
        except FileNotFoundError:
            pass
        else:
            if member.isdir() and stat.S_ISDIR(st.st_mode):
                pass
            elif stat.S_ISDIR(st.st_mode):
                raise UnsafeArchiveError(f"refusing tar member {member.name!r}: it would replace a directory")
            else:
                target_path.unlink()
        if member.isdir():
            self._safe_dirs.add(rel)
        xattrs = {
            k.removeprefix(_XATTR_PREFIX): v for k, v in member.pax_headers.items() if k.startswith(_XATTR_PREFIX)
        }
        if xattrs and not member.issym():
            self.xattrs.append((rel, xattrs))
        return tarcompat.replace(member, **changes)

    def apply_xattrs(self) -> None:
        """Set the extended attributes tarfile itself ignores (file capabilities such as ping's cap_net_raw)."""
        for rel, attrs in self.xattrs:
            for key, value in attrs.items():
                try:
                    os.setxattr(self.dest / rel, key, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
                except OSError as exc:
                    log.warning("rootfs: cannot set xattr %s on /%s: %s", key, rel, exc)


def extract_rootfs(
    src: Path, dest: Path, *, progress: Progress, step: str, cancel: threading.Event | None = None
) -> int:
    """Extract a rootfs tarball into the existing directory `dest` safely; returns the number of members read."""
    flt = _RootfsFilter(dest, progress, step, cancel)
    try:
        with open_tar_stream(src) as tf:
            tarcompat.extractall(tf, str(dest), flt, numeric_owner=True)
        flt.apply_xattrs()
    except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
        raise UnsafeArchiveError(f"{src}: damaged or unreadable tar archive ({exc})") from exc
    if flt.skipped_devices:
        log.info("rootfs %s: skipped %d device nodes (the guest mounts devtmpfs)", src, flt.skipped_devices)
    progress(ProgressEvent(step=step, done=flt.count, total=flt.count, unit="files"))
    return flt.count


def pack_rootfs(src_dir: Path, out: Path, *, progress: Progress, step: str) -> None:
    """Write `src_dir` as an uncompressed tarball with numeric ownership (for the bootstrap cache)."""
    count = 0

    def tick(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal count
        count += 1
        if count % _REPORT_EVERY == 0:
            progress(ProgressEvent(step=step, done=count, unit="files"))
        info.uname = info.gname = ""
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for entry in sorted(os.listdir(src_dir)):
            tf.add(src_dir / entry, arcname=f"./{entry}", recursive=True, filter=tick)


def is_probably_tar(path: Path) -> bool:
    """True when `path` is a file that opens as a (possibly compressed) tar archive."""
    try:
        with open_tar_stream(path) as tf:
            return tf.next() is not None
    except (UnsafeArchiveError, tarfile.TarError, OSError, EOFError, zstandard.ZstdError):
        return False
