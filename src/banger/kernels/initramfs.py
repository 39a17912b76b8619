"""banger's own small initramfs: static busybox, the virtio modules, and an /init that mounts root and switches."""

from __future__ import annotations

import gzip
import io
import lzma
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path

import zstandard

from banger.errors import InvalidInputError, NotFoundError
from banger.fsutil import atomic_write
from banger.kernels.vmlinux import elf_interpreter, is_elf

# Drivers a banger guest needs before its root is mounted (and that stay loaded after switch_root). Names as in
# modules.dep (file stem); modules the kernel has built in (=y) are simply absent from the tree and skipped.
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
    "vmw_vsock_virtio_transport",
    "ext4",
    # The ACPI power button and evdev: QEMU's system_powerdown then reaches banger-init as a key press.
    "button",
    "evdev",
)
LOAD_ORDER = "lib/modules/load-order"
# The busybox applets /init calls, linked in /bin.
APPLETS: tuple[str, ...] = (
    "sh",
    "cat",
    "echo",
    "findfs",
    "insmod",
    "ls",
    "mkdir",
    "mount",
    "poweroff",
    "sleep",
    "switch_root",
    "sync",
    "tr",
    "umount",
    "uname",
)
INIT_SCRIPT = "init"


class Compression(StrEnum):
    """How the initramfs archive is compressed; the kernel must have the matching CONFIG_RD_* option."""

    ZSTD = "zstd"
    GZIP = "gzip"
    NONE = "none"


_CONFIG_OPTION = {Compression.ZSTD: "CONFIG_RD_ZSTD", Compression.GZIP: "CONFIG_RD_GZIP"}


@dataclass(frozen=True, slots=True)
class Entry:
    """One cpio member: a directory, regular file, symlink or device node."""

    path: str  # relative to the archive root, no leading slash
    mode: int  # including the file-type bits
    data: bytes = b""  # file contents, or the symlink target
    rdev: tuple[int, int] = (0, 0)


def directory(path: str) -> Entry:
    """A directory entry (0755)."""
    return Entry(path, stat.S_IFDIR | 0o755)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    """A regular file entry."""
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    """A symbolic link entry."""
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int) -> Entry:
    """A character device node; the cpio carries it, so building needs no root and no mknod."""
    return Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\x00" * (-n % 4)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """Serialise entries as an SVR4 "newc" cpio archive (what the kernel unpacks), with a TRAILER!!! end."""
    buf = io.BytesIO()

    def member(ino: int, entry: Entry) -> None:
        name = entry.path.encode() + b"\x00"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        # Fixed uid/gid/mtime keep the archive reproducible: same inputs, same bytes.
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        buf.write(header + name + _pad4(len(header) + len(name)))
        buf.write(entry.data + _pad4(len(entry.data)))

    for ino, entry in enumerate(entries, start=1):
        if entry.path.startswith("/") or not entry.path:
            raise InvalidInputError(f"cpio member path must be relative: {entry.path!r}")
        member(ino, entry)
    member(0, Entry("TRAILER!!!", 0))
    return buf.getvalue()


def read_modules_dep(modules_dir: Path) -> dict[str, list[str]]:
    """modules.dep as {relative module path: [dependency paths, the one to load last first]}."""
    dep_file = modules_dir / "modules.dep"
    try:
        text = dep_file.read_text()
    except FileNotFoundError as exc:
        raise NotFoundError(f"{dep_file} is missing (was depmod run on this module tree?)") from exc
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        module, sep, rest = line.partition(":")
        if sep:
            deps[module.strip()] = rest.split()
    return deps


def _read_optional(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def read_softdeps(modules_dir: Path) -> dict[str, list[str]]:
    """The "pre:" soft dependencies of modules.softdep: {module name: [module names or aliases]}."""
    pre: dict[str, list[str]] = {}
    for line in _read_optional(modules_dir / "modules.softdep"):
        words = line.split()
        if len(words) < 3 or words[0] != "softdep" or words[2] != "pre:":
            continue
        names = pre.setdefault(_norm(words[1]), [])
        for word in words[3:]:
            if word.endswith(":"):
                break  # a following "post:" section
            names.append(word)
    return pre


def read_aliases(modules_dir: Path) -> dict[str, list[str]]:
    """Exact (wildcard-free) aliases of modules.alias: {alias: [module names]}, e.g. crypto-crc32c."""
    aliases: dict[str, list[str]] = {}
    for line in _read_optional(modules_dir / "modules.alias"):
        words = line.split()
        if len(words) == 3 and words[0] == "alias" and not any(c in words[1] for c in "*?["):
            aliases.setdefault(words[1], []).append(_norm(words[2]))
    return aliases


def _norm(name: str) -> str:
    # kbuild treats - and _ in module names alike; modules.dep keeps the file's own spelling.
    return name.replace("-", "_")


def module_name(rel_path: str) -> str:
    """kernel/fs/ext4/ext4.ko.xz -> ext4."""
    name = rel_path.rsplit("/", 1)[-1]
    for suffix in _DECOMPRESS:
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko")


@dataclass(frozen=True, slots=True)
class ModuleLoad:
    """One module for /init to insmod; optional ones (soft dependencies) may fail, e.g. CPU-specific crypto."""

    path: str
    optional: bool = False


def resolve_load_order(modules_dir: Path, wanted: Sequence[str]) -> list[ModuleLoad]:
    """`wanted` modules present in the tree, after their hard dependencies and their soft "pre:" ones."""
    deps = read_modules_dep(modules_dir)
    softdeps = read_softdeps(modules_dir)
    aliases = read_aliases(modules_dir)
    by_name = {_norm(module_name(p)): p for p in deps}
    order: dict[str, bool] = {}  # path -> optional, in load order
    visiting: set[str] = set()

    def add(path: str, optional: bool) -> None:
        # depmod lists a module's (transitive) dependencies so that the last must be loaded first.
        for item in [*reversed(deps[path]), path]:
            if item in order:
                order[item] = order[item] and optional  # a required load upgrades an optional one
                continue
            if item in visiting:
                continue  # a soft-dependency cycle
            visiting.add(item)
            # ext4 needs crc32c through the crypto API, which modules.dep cannot see: modprobe's softdeps say so.
            for soft in softdeps.get(_norm(module_name(item)), []):
                for name in aliases.get(soft, [_norm(soft)]):
                    if name in by_name:
                        add(by_name[name], True)
            order[item] = optional

    for name in wanted:
        path = by_name.get(_norm(name))
        if path is not None:  # absent: built into the kernel, or not built at all; nothing to load
            add(path, False)
    return [ModuleLoad(path, optional) for path, optional in order.items()]


def kernel_supports(config_text: str, option: str) -> bool:
    """True when `option` is =y in a kernel config text."""
    return f"\n{option}=y\n" in f"\n{config_text}\n"


def pick_compression(config_text: str) -> Compression:
    """The best initramfs compression the kernel can unpack: zstd, else gzip, else none."""
    for kind in (Compression.ZSTD, Compression.GZIP):
        if kernel_supports(config_text, _CONFIG_OPTION[kind]):
            return kind
    return Compression.NONE


def compress(archive: bytes, kind: Compression) -> bytes:
    """Compress a cpio archive the way the kernel expects (single zstd frame, or gzip)."""
    if kind is Compression.ZSTD:
        out: bytes = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(archive)
        return out
    if kind is Compression.GZIP:
        return gzip.compress(archive, compresslevel=9, mtime=0)
    return archive


def init_script() -> bytes:
    """The /init shell script shipped as package data."""
    return resources.files("banger.kernels").joinpath("files", INIT_SCRIPT).read_bytes()


def check_static_busybox(busybox: Path) -> None:
    """Refuse a busybox that would need a dynamic loader (there is none in the initramfs)."""
    if not busybox.is_file():
        raise NotFoundError(f"busybox binary {busybox} does not exist")
    if not is_elf(busybox):
        raise InvalidInputError(f"{busybox} is not an ELF executable")
    interp = elf_interpreter(busybox)
    if interp is not None:
        raise InvalidInputError(
            f"{busybox} is dynamically linked (needs {interp})", hint="use busybox from the busybox-static package"
        )


def _unzstd(data: bytes) -> bytes:
    out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return out


# Module files may be compressed (newer Debian ships .ko.xz); the initramfs stores them plain so busybox insmod,
# whatever its build options, can load them.
_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {".xz": lzma.decompress, ".gz": gzip.decompress, ".zst": _unzstd}


def _plain_module(modules_dir: Path, rel: str) -> tuple[str, bytes]:
    data = (modules_dir / rel).read_bytes()
    for suffix, decompress in _DECOMPRESS.items():
        if rel.endswith(suffix):
            return rel.removesuffix(suffix), decompress(data)
    return rel, data


def initramfs_entries(modules_dir: Path, load_order: Sequence[ModuleLoad], busybox: Path) -> list[Entry]:
    """Every member of banger's initramfs, parents before children."""
    entries = [directory(d) for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules")]
    # The kernel opens /dev/console for init's stdio before /init runs, so the node must be in the archive.
    entries += [char_device("dev/console", 5, 1), char_device("dev/null", 1, 3)]
    entries.append(regular("bin/busybox", busybox.read_bytes(), 0o755))
    entries += [symlink(f"bin/{applet}", "busybox") for applet in APPLETS]
    entries.append(regular("init", init_script(), 0o755))
    made: set[str] = {"lib/modules"}
    lines: list[str] = []
    for load in load_order:
        rel, data = _plain_module(modules_dir, load.path)
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            parent = "lib/modules/" + "/".join(parts[:depth])
            if parent not in made:
                made.add(parent)
                entries.append(directory(parent))
        entries.append(regular(f"lib/modules/{rel}", data))
        lines.append(f"{rel} optional\n" if load.optional else f"{rel}\n")
    entries.append(regular(LOAD_ORDER, "".join(lines).encode()))
    return entries


def build_initramfs(
    out: Path,
    *,
    modules_dir: Path,
    busybox: Path,
    config_text: str,
    modules: Sequence[str] = INITRAMFS_MODULES,
) -> list[ModuleLoad]:
    """Write banger's compressed initramfs to `out` atomically; returns the modules it loads, in order."""
    check_static_busybox(busybox)
    load_order = resolve_load_order(modules_dir, modules)
    archive = write_newc(initramfs_entries(modules_dir, load_order, busybox))
    atomic_write(out, compress(archive, pick_compression(config_text)))
    return load_order
