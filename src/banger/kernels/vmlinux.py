"""Look inside kernel images: ELF facts (entry, PVH note), the version banner, and bzImage -> vmlinux extraction."""

from __future__ import annotations

import bz2
import lzma
import mmap
import re
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import zstandard

from banger import proc
from banger.errors import InvalidInputError, NotFoundError
from banger.fsutil import atomic_write

ELF_MAGIC = b"\x7fELF"
# Xen's ELF note whose descriptor is the 32-bit PVH entry point; QEMU microvm and cloud-hypervisor boot through it.
XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_INTERP = 3
_PT_NOTE = 4
_SHT_NOTE = 7
_BANNER = re.compile(rb"Linux version (\d\S*) ")


class Compression(StrEnum):
    """How a bzImage's payload is compressed (the kernel's CONFIG_KERNEL_* choice)."""

    GZIP = "gzip"
    XZ = "xz"
    LZMA = "lzma"
    ZSTD = "zstd"
    LZ4 = "lz4"
    BZIP2 = "bzip2"
    LZO = "lzo"


# Magic bytes at the start of each compressed stream; LZMA's is only a weak guess (properties byte + dict size).
_MAGICS: dict[Compression, bytes] = {
    Compression.GZIP: b"\x1f\x8b\x08",
    Compression.XZ: b"\xfd7zXZ\x00",
    Compression.ZSTD: b"\x28\xb5\x2f\xfd",
    Compression.LZ4: b"\x02\x21\x4c\x18",
    Compression.BZIP2: b"BZh",
    Compression.LZO: b"\x89LZO",
    Compression.LZMA: b"\x5d\x00\x00",
}


class KernelImageError(InvalidInputError):
    """A file is not the kernel image it was supposed to be."""


@dataclass(frozen=True, slots=True)
class _Elf:
    is64: bool
    endian: str  # struct prefix: "<" or ">"

    @classmethod
    def parse(cls, data: bytes | mmap.mmap, path: Path) -> _Elf:
        if len(data) < 52 or data[:4] != ELF_MAGIC:
            raise KernelImageError(f"{path}: not an ELF file")
        ei_class, ei_data = data[4], data[5]
        if ei_class not in (1, 2) or ei_data not in (1, 2):
            raise KernelImageError(f"{path}: corrupt ELF header (class {ei_class}, data {ei_data})")
        return cls(is64=ei_class == 2, endian="<" if ei_data == 1 else ">")

    def entry(self, data: bytes | mmap.mmap) -> int:
        fmt = "Q" if self.is64 else "I"
        return int(struct.unpack_from(self.endian + fmt, data, 24)[0])

    def program_headers(self, data: bytes | mmap.mmap) -> Iterator[tuple[int, int, int]]:
        """(p_type, p_offset, p_filesz) of each program header."""
        e = self.endian
        if self.is64:
            phoff, phentsize, phnum = struct.unpack_from(e + "Q", data, 32)[0], *struct.unpack_from(e + "HH", data, 54)
        else:
            phoff, phentsize, phnum = struct.unpack_from(e + "I", data, 28)[0], *struct.unpack_from(e + "HH", data, 42)
        for i in range(phnum):
            at = phoff + i * phentsize
            if self.is64:
                p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(e + "IIQQQQ", data, at)
            else:
                p_type, p_offset, _va, _pa, p_filesz = struct.unpack_from(e + "IIIII", data, at)
            yield p_type, p_offset, p_filesz

    def section_headers(self, data: bytes | mmap.mmap) -> Iterator[tuple[int, int, int]]:
        """(sh_type, sh_offset, sh_size) of each section header."""
        e = self.endian
        if self.is64:
            shoff = struct.unpack_from(e + "Q", data, 40)[0]
            shentsize, shnum = struct.unpack_from(e + "HH", data, 58)
        else:
            shoff = struct.unpack_from(e + "I", data, 32)[0]
            shentsize, shnum = struct.unpack_from(e + "HH", data, 46)
        for i in range(shnum if shoff else 0):
            at = shoff + i * shentsize
            if self.is64:
                _name, sh_type, _flags, _addr, sh_offset, sh_size = struct.unpack_from(e + "IIQQQQ", data, at)
            else:
                _name, sh_type, _flags, _addr, sh_offset, sh_size = struct.unpack_from(e + "IIIIII", data, at)
            yield sh_type, sh_offset, sh_size


def _notes(data: bytes | mmap.mmap, offset: int, size: int, endian: str) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note in a note segment; name and desc are 4-byte aligned."""
    end = min(offset + size, len(data))
    at = offset
    while at + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from(endian + "III", data, at)
        at += 12
        name = bytes(data[at : at + namesz]).rstrip(b"\x00")
        at += (namesz + 3) & ~3
        desc = bytes(data[at : at + descsz])
        at += (descsz + 3) & ~3
        yield name, ntype, desc


def _open_map(path: Path) -> mmap.mmap:
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) == 0:
                raise KernelImageError(f"{path}: empty file")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError as exc:
        raise NotFoundError(f"kernel image {path} does not exist") from exc


def is_elf(path: Path) -> bool:
    """True when `path` starts with the ELF magic (a vmlinux that Firecracker can load)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except FileNotFoundError as exc:
        raise NotFoundError(f"kernel image {path} does not exist") from exc


def elf_entry(path: Path) -> int:
    """The ELF entry point address of `path`."""
    with _open_map(path) as data:
        return _Elf.parse(data, path).entry(data)


def has_pvh_note(path: Path) -> bool:
    """True when the ELF carries a Xen PHYS32_ENTRY note, i.e. it can boot through the PVH entry point."""
    with _open_map(path) as data:
        if data[:4] != ELF_MAGIC:
            return False  # a bzImage or anything else: no PVH entry to find
        elf = _Elf.parse(data, path)
        try:
            segments = [(o, s) for t, o, s in elf.program_headers(data) if t == _PT_NOTE]
            if not segments:
                segments = [(o, s) for t, o, s in elf.section_headers(data) if t == _SHT_NOTE]
            return any(
                name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY
                for offset, size in segments
                for name, ntype, _desc in _notes(data, offset, size, elf.endian)
            )
        except struct.error as exc:
            raise KernelImageError(f"{path}: truncated ELF headers") from exc


def elf_interpreter(path: Path) -> str | None:
    """The PT_INTERP program loader an ELF executable asks for; None for a static binary (or a kernel)."""
    with _open_map(path) as data:
        elf = _Elf.parse(data, path)
        try:
            for p_type, offset, size in elf.program_headers(data):
                if p_type == _PT_INTERP:
                    return bytes(data[offset : offset + size]).rstrip(b"\x00").decode(errors="replace")
        except struct.error as exc:
            raise KernelImageError(f"{path}: truncated ELF headers") from exc
    return None


@dataclass(frozen=True, slots=True)
class _BzImage:
    setup_size: int
    payload_offset: int
    payload_length: int
    version_offset: int | None


def _bzimage_header(data: bytes | mmap.mmap) -> _BzImage | None:
    """The x86 boot-protocol header fields we need, or None when this is not a bzImage."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    setup_sects = data[0x1F1] or 4  # 0 means 4 in the boot protocol
    setup_size = (setup_sects + 1) * 512
    (version_ptr,) = struct.unpack_from("<H", data, 0x20E)
    payload_offset = payload_length = 0
    if protocol >= 0x208:
        payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    return _BzImage(
        setup_size=setup_size,
        payload_offset=setup_size + payload_offset,
        payload_length=payload_length,
        version_offset=version_ptr + 0x200 if version_ptr else None,
    )


def _gunzip(payload: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(payload)


def _unxz(payload: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)


def _unlzma(payload: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)


def _unzstd(payload: bytes) -> bytes:
    out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    return out


def _bunzip2(payload: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(payload)


def _unlz4(payload: bytes) -> bytes:
    # No LZ4 in the standard library; the lz4 tool reads the kernel's legacy-frame format. A trailing size word
    # (the kernel appends the uncompressed length) makes it exit 1 after writing everything, so judge the output.
    tool = proc.which("lz4", hint="install the Debian package lz4")
    return proc.run([tool, "-dc"], input=payload, check=False, step="decompress lz4 kernel payload").stdout


def _unlzo(payload: bytes) -> bytes:
    tool = proc.which("lzop", hint="install the Debian package lzop")
    return proc.run([tool, "-dc"], input=payload, check=False, step="decompress lzo kernel payload").stdout


_DECOMPRESSORS: dict[Compression, Callable[[bytes], bytes]] = {
    Compression.GZIP: _gunzip,
    Compression.XZ: _unxz,
    Compression.LZMA: _unlzma,
    Compression.ZSTD: _unzstd,
    Compression.LZ4: _unlz4,
    Compression.BZIP2: _bunzip2,
    Compression.LZO: _unlzo,
}


def detect_compression(payload: bytes) -> Compression | None:
    """Which compressor produced `payload`, judged by its leading magic."""
    for kind, magic in _MAGICS.items():
        if payload.startswith(magic):
            return kind
    return None


def _try_decompress(kind: Compression, payload: bytes) -> bytes | None:
    try:
        out = _DECOMPRESSORS[kind](payload)
    except (zlib.error, lzma.LZMAError, zstandard.ZstdError, OSError, EOFError, ValueError):
        return None
    return out if out.startswith(ELF_MAGIC) else None


def _candidates(data: bytes) -> Iterator[tuple[Compression, int]]:
    """Every offset where a compressed stream might start, in file order (for images without a usable header)."""
    hits: list[tuple[int, Compression]] = []
    for kind, magic in _MAGICS.items():
        if kind is Compression.LZMA:
            continue  # too weak a magic to scan for; only trusted when the header points at it
        start = data.find(magic)
        while start != -1:
            hits.append((start, kind))
            start = data.find(magic, start + 1)
    for start, kind in sorted(hits):
        yield kind, start


def decompress_bzimage(bzimage: Path) -> bytes:
    """The uncompressed ELF vmlinux inside a bzImage (or the file itself when it already is ELF)."""
    try:
        data = bzimage.read_bytes()
    except FileNotFoundError as exc:
        raise NotFoundError(f"kernel image {bzimage} does not exist") from exc
    if data.startswith(ELF_MAGIC):
        return data
    header = _bzimage_header(data)
    if header is not None and header.payload_length:
        payload = data[header.payload_offset : header.payload_offset + header.payload_length]
        kind = detect_compression(payload)
        if kind is not None:
            out = _try_decompress(kind, payload)
            if out is not None:
                return out
    for kind, start in _candidates(data):
        out = _try_decompress(kind, data[start:])
        if out is not None:
            return out
    what = "a bzImage" if header is not None else "not a bzImage (no HdrS boot header)"
    raise KernelImageError(
        f"{bzimage}: {what}, and no compressed ELF kernel found inside it",
        hint="pass a vmlinuz/bzImage or an uncompressed vmlinux",
    )


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the uncompressed ELF kernel found inside `bzimage` to `out` atomically."""
    if is_elf(bzimage):
        with _open_map(bzimage) as data:
            _Elf.parse(data, bzimage)
        tmp = out.with_name(f".{out.name}.copy")
        shutil.copyfile(bzimage, tmp)
        tmp.replace(out)
        return
    vmlinux = decompress_bzimage(bzimage)
    _Elf.parse(vmlinux, bzimage)
    atomic_write(out, vmlinux)


def read_kernel_version(path: Path) -> str | None:
    """The `uname -r` of a kernel image (vmlinux or bzImage), from its "Linux version <ver> " banner."""
    with _open_map(path) as data:
        if data[:4] != ELF_MAGIC:
            header = _bzimage_header(data)
            if header is None:
                return None
            # The setup header points at "<ver> (builder@host) #1 ..."; fall back to the payload's banner.
            if header.version_offset is not None:
                raw = bytes(data[header.version_offset : header.version_offset + 256]).split(b"\x00", 1)[0]
                words = raw.split()
                if words and words[0][:1].isdigit():
                    return words[0].decode(errors="replace")
            try:
                vmlinux = decompress_bzimage(path)
            except KernelImageError:
                return None
            found = _BANNER.search(vmlinux)
            return found.group(1).decode(errors="replace") if found else None
        found = _BANNER.search(data)
        return found.group(1).decode(errors="replace") if found else None


def kernel_compression(bzimage: Path) -> Compression | None:
    """The payload compression a bzImage's header points at (None when not a bzImage)."""
    with _open_map(bzimage) as data:
        header = _bzimage_header(data)
        if header is None or not header.payload_length:
            return None
        return detect_compression(bytes(data[header.payload_offset : header.payload_offset + 16]))


__all__ = [
    "Compression",
    "KernelImageError",
    "decompress_bzimage",
    "detect_compression",
    "elf_entry",
    "elf_interpreter",
    "extract_vmlinux",
    "has_pvh_note",
    "is_elf",
    "kernel_compression",
    "read_kernel_version",
]
