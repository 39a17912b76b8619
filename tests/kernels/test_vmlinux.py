"""kernels.vmlinux: ELF/PVH/version parsing and bzImage extraction, on Debian's real kernel and on crafted images."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from banger import proc
from banger.errors import NotFoundError
from banger.fsutil import sha256_file
from banger.kernels.manifest import CONFIG, MODULES, VMLINUX
from banger.kernels.vmlinux import (
    Compression,
    KernelImageError,
    decompress_bzimage,
    elf_entry,
    elf_interpreter,
    extract_vmlinux,
    has_pvh_note,
    is_elf,
    kernel_compression,
    read_kernel_version,
)

FAKE_VERSION = "9.9.9-banger-test"
BANNER = f"Linux version {FAKE_VERSION} (test@host) (gcc) #1 SMP\n".encode()


def make_elf(
    *, entry: int = 0x1000000, note: tuple[bytes, int] | None = (b"Xen", 18), is64: bool = True, endian: str = "<"
) -> bytes:
    """A minimal ELF executable with one PT_NOTE segment and a Linux banner after it."""
    e = endian
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    notes = b""
    if note is not None:
        name = note[0] + b"\x00"
        name += b"\x00" * (-len(name) % 4)
        notes = struct.pack(e + "III", len(note[0]) + 1, 4, note[1]) + name + struct.pack(e + "I", 0x1000)
    note_off = ehsize + phentsize
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if e == "<" else 2, 1]) + b"\x00" * 9
    if is64:
        header = ident + struct.pack(e + "HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0, ehsize, phentsize, 1, 64, 0, 0)
        phdr = struct.pack(e + "IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    else:
        header = ident + struct.pack(e + "HHIIIIIHHHHHH", 2, 3, 1, entry, ehsize, 0, 0, ehsize, phentsize, 1, 40, 0, 0)
        phdr = struct.pack(e + "IIIIIIII", 4, note_off, 0, 0, len(notes), len(notes), 4, 4)
    return header + phdr + notes + b"\x00" * 64 + BANNER + b"\x00" * 256


def make_bzimage(payload: bytes, *, version_ptr: bool = True, header: bool = True) -> bytes:
    """An x86 boot-protocol image: one setup sector plus `payload` where the header says it is."""
    setup = bytearray(1024)
    if header:
        setup[0x1F1] = 1  # setup_sects: (1 + 1) * 512 bytes of setup
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, 0x20F)
        if version_ptr:
            setup[0x300 : 0x300 + 40] = f"{FAKE_VERSION} (test@host) #1 SMP".encode().ljust(40, b"\x00")
            struct.pack_into("<H", setup, 0x20E, 0x100)
        struct.pack_into("<II", setup, 0x248, 0x10, len(payload) + 4)
    # The kernel build appends the uncompressed size after the stream; decoders must tolerate it.
    return bytes(setup) + b"\x00" * 0x10 + payload + struct.pack("<I", 12345) + b"\xff" * 64


def _lz4(data: bytes) -> bytes:
    return proc.run(["lz4", "-l", "-c", "-9"], input=data).stdout


COMPRESSORS: dict[Compression, Callable[[bytes], bytes]] = {
    Compression.GZIP: lambda d: gzip.compress(d, mtime=0),
    Compression.XZ: lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    Compression.LZMA: lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    Compression.ZSTD: lambda d: zstandard.ZstdCompressor().compress(d),
    Compression.BZIP2: bz2.compress,
    Compression.LZ4: _lz4,
}


# --- crafted inputs ---------------------------------------------------------------------------------------------


def test_crafted_elf_facts(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_elf(entry=0x1234000))
    assert is_elf(path)
    assert elf_entry(path) == 0x1234000
    assert has_pvh_note(path)
    assert read_kernel_version(path) == FAKE_VERSION
    assert elf_interpreter(path) is None


def test_version_skips_format_strings(tmp_path: Path) -> None:
    elf = make_elf()
    decoy = b"Linux version %s (%s)\x00"
    at = elf.index(BANNER) - 64
    path = tmp_path / "vmlinux"
    path.write_bytes(elf[:at] + decoy + elf[at + len(decoy) :])
    assert read_kernel_version(path) == FAKE_VERSION


@pytest.mark.parametrize("is64,endian", [(False, "<"), (True, ">"), (False, ">")])
def test_other_elf_classes_and_byte_orders(tmp_path: Path, is64: bool, endian: str) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_elf(entry=0x200000, is64=is64, endian=endian))
    assert elf_entry(path) == 0x200000
    assert has_pvh_note(path)


@pytest.mark.parametrize("note", [None, (b"Xen", 17), (b"GNU", 18)])
def test_no_pvh_note_without_the_xen_phys32_entry(tmp_path: Path, note: tuple[bytes, int] | None) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_elf(note=note))
    assert is_elf(path)
    assert not has_pvh_note(path)


def test_not_elf_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"MZ" + b"\x00" * 200)
    assert not is_elf(junk)
    assert not has_pvh_note(junk)
    with pytest.raises(KernelImageError, match="not an ELF file"):
        elf_entry(junk)
    assert read_kernel_version(junk) is None


def test_empty_missing_and_truncated_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(KernelImageError, match="empty file"):
        has_pvh_note(empty)
    with pytest.raises(KernelImageError, match="empty file"):
        read_kernel_version(empty)
    with pytest.raises(NotFoundError, match="does not exist"):
        is_elf(tmp_path / "absent")
    with pytest.raises(NotFoundError):
        extract_vmlinux(tmp_path / "absent", tmp_path / "out")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(make_elf()[:70])  # header says a program header follows; the file stops first
    with pytest.raises(KernelImageError, match="truncated"):
        has_pvh_note(truncated)


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_extract_each_compression(tmp_path: Path, kind: Compression) -> None:
    elf = make_elf()
    image = tmp_path / "bzImage"
    image.write_bytes(make_bzimage(COMPRESSORS[kind](elf)))
    assert kernel_compression(image) is kind
    assert read_kernel_version(image) == FAKE_VERSION
    out = tmp_path / "vmlinux"
    extract_vmlinux(image, out)
    assert out.read_bytes() == elf
    assert has_pvh_note(out)


def test_version_from_payload_when_header_has_no_pointer(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(make_bzimage(COMPRESSORS[Compression.XZ](make_elf()), version_ptr=False))
    assert read_kernel_version(image) == FAKE_VERSION


def test_extract_without_boot_header_scans_for_a_stream(tmp_path: Path) -> None:
    elf = make_elf()
    image = tmp_path / "blob"
    # A gzip magic that is not a stream comes first; the scan must skip it and find the zstd one.
    image.write_bytes(make_bzimage(b"\x1f\x8b\x08garbage" + COMPRESSORS[Compression.ZSTD](elf), header=False))
    assert decompress_bzimage(image) == elf
    assert read_kernel_version(image) is None  # without HdrS it is not recognisable as a kernel image


def test_uncompressed_elf_is_copied(tmp_path: Path) -> None:
    src = tmp_path / "vmlinux.in"
    src.write_bytes(make_elf())
    out = tmp_path / "vmlinux"
    extract_vmlinux(src, out)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    "payload",
    [b"\x00" * 4096, COMPRESSORS[Compression.GZIP](b"not an elf kernel" * 100), b"\xfd7zXZ\x00corrupt-xz"],
    ids=["no-stream", "not-elf-inside", "corrupt-stream"],
)
def test_bad_bzimage_is_a_clear_error_and_writes_nothing(tmp_path: Path, payload: bytes) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(make_bzimage(payload))
    out = tmp_path / "vmlinux"
    with pytest.raises(KernelImageError, match="no compressed ELF kernel found"):
        extract_vmlinux(image, out)
    assert list(tmp_path.iterdir()) == [image]


def test_random_file_is_not_a_bzimage(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(KernelImageError, match="not a bzImage"):
        extract_vmlinux(blob, tmp_path / "vmlinux")


def test_elf_interpreter_tells_static_from_dynamic(static_busybox: Path) -> None:
    assert elf_interpreter(static_busybox) is None
    assert (elf_interpreter(Path("/bin/ls")) or "").startswith("/lib")


# --- Debian's real kernel ---------------------------------------------------------------------------------------


def test_real_kernel_facts(debian_kernel: Path) -> None:
    vmlinux = debian_kernel / VMLINUX
    (version_dir,) = (debian_kernel / MODULES).iterdir()
    assert is_elf(vmlinux)
    assert has_pvh_note(vmlinux)
    assert read_kernel_version(vmlinux) == version_dir.name
    config = (debian_kernel / CONFIG).read_text()
    physical_start = next(line for line in config.splitlines() if line.startswith("CONFIG_PHYSICAL_START="))
    assert elf_entry(vmlinux) == int(physical_start.split("=")[1], 16)


def test_real_bzimage(debian_vmlinuz: Path, debian_kernel: Path, tmp_path: Path) -> None:
    (version_dir,) = (debian_kernel / MODULES).iterdir()
    version = version_dir.name
    assert not is_elf(debian_vmlinuz)
    assert not has_pvh_note(debian_vmlinuz)  # the note lives in the ELF inside, not in the bzImage wrapper
    assert read_kernel_version(debian_vmlinuz) == version
    assert kernel_compression(debian_vmlinuz) in set(Compression)
    out = tmp_path / "vmlinux"
    extract_vmlinux(debian_vmlinuz, out)
    assert sha256_file(out) == sha256_file(debian_kernel / VMLINUX)
