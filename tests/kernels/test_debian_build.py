"""Building a guest kernel from Debian's package: the artifacts, banger's initramfs, and real boots under QEMU TCG."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import re
from pathlib import Path

import pytest
import zstandard

from banger import proc
from banger.errors import InvalidInputError, NotFoundError
from banger.fsutil import sha256_file
from banger.kernels import debian
from banger.kernels.initramfs import (
    INITRAMFS_MODULES,
    LOAD_ORDER,
    Compression,
    ModuleLoad,
    build_initramfs,
    char_device,
    check_static_busybox,
    directory,
    pick_compression,
    read_modules_dep,
    regular,
    resolve_load_order,
    symlink,
    write_newc,
)
from banger.kernels.manifest import CMDLINE, CONFIG, INITRD, MODULES, VMLINUX, read_manifest
from banger.progress import no_progress
from tests.kernels.conftest import ROOT_MARKER, BootFn, build_cached_kernel, make_root_disk

# --- initramfs pieces on crafted inputs -------------------------------------------------------------------------


def _cpio_list(archive: bytes) -> list[str]:
    return proc.run(["cpio", "-it", "--quiet"], input=archive).stdout.decode().split()


def test_newc_archive_reads_back_with_real_cpio(tmp_path: Path) -> None:
    archive = write_newc(
        [
            directory("bin"),
            regular("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
            symlink("bin/sh", "tool"),
            regular("odd", b"x" * 5),  # lengths that need padding on both name and data
            char_device("console", 5, 1),
        ]
    )
    assert _cpio_list(archive) == ["bin", "bin/tool", "bin/sh", "odd", "console"]
    verbose = proc.run(["cpio", "-itv", "--quiet"], input=archive).stdout.decode()
    assert re.search(r"^crw-------.*\b5,\s+1\b.*console$", verbose, re.M), verbose
    proc.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], cwd=tmp_path, input=archive)
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin" / "sh").readlink() == Path("tool")
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


def test_newc_is_reproducible_and_rejects_absolute_paths() -> None:
    entries = [directory("a"), regular("a/b", b"data")]
    assert write_newc(entries) == write_newc(entries)
    with pytest.raises(InvalidInputError, match="relative"):
        write_newc([regular("/etc/passwd", b"")])


def test_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\nkernel/x-y.ko:\nkernel/z.ko:\n"
    )
    order = resolve_load_order(tmp_path, ["a", "x_y", "built_in_thing", "c"])
    assert order == [ModuleLoad(p) for p in ("kernel/c.ko", "kernel/b.ko", "kernel/a.ko", "kernel/x-y.ko")]


def test_soft_dependencies_come_first_and_are_optional(tmp_path: Path) -> None:
    # ext4's shape in Debian's generic kernel: a crypto-API need that only modules.softdep + modules.alias express.
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz\n"
        "kernel/fs/jbd2/jbd2.ko.xz:\n"
        "kernel/crypto/crc32c_generic.ko.xz:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz:\n"
        "kernel/loop-a.ko:\nkernel/loop-b.ko:\n"
    )
    (tmp_path / "modules.softdep").write_text(
        "# comment\nsoftdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crypto-crc32c post: nothing\n"
        "softdep loop_a pre: loop_b\nsoftdep loop_b pre: loop-a\n"
    )
    (tmp_path / "modules.alias").write_text(
        "alias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\nalias virtio:d00000002v* virtio_blk\n"
    )
    order = resolve_load_order(tmp_path, ["ext4", "loop_a"])
    assert order == [
        ModuleLoad("kernel/arch/x86/crypto/crc32c-intel.ko.xz", optional=True),
        ModuleLoad("kernel/crypto/crc32c_generic.ko.xz", optional=True),
        ModuleLoad("kernel/fs/jbd2/jbd2.ko.xz"),
        ModuleLoad("kernel/fs/ext4/ext4.ko.xz"),
        ModuleLoad("kernel/loop-b.ko", optional=True),
        ModuleLoad("kernel/loop-a.ko"),
    ]
    # Asked for outright, a soft dependency becomes required.
    assert ModuleLoad("kernel/crypto/crc32c_generic.ko.xz") in resolve_load_order(tmp_path, ["ext4", "crc32c_generic"])


def test_compressed_modules_are_stored_plain(tmp_path: Path, static_busybox: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "m.ko.xz").write_bytes(lzma.compress(b"\x7fELF module bytes"))
    (tmp_path / "modules.dep").write_text("kernel/m.ko.xz:\n")
    out = tmp_path / "initrd"
    build_initramfs(out, modules_dir=tmp_path, busybox=static_busybox, config_text="CONFIG_RD_GZIP=y\n", modules=["m"])
    archive = gzip.decompress(out.read_bytes())
    assert _extract_member(archive, "lib/modules/kernel/m.ko") == b"\x7fELF module bytes"
    assert _extract_member(archive, LOAD_ORDER) == b"kernel/m.ko\n"


def test_load_order_needs_modules_dep(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="modules.dep is missing"):
        read_modules_dep(tmp_path)


def test_compression_follows_kernel_config() -> None:
    assert pick_compression("CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n") is Compression.ZSTD
    assert pick_compression("CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n") is Compression.GZIP
    assert pick_compression("CONFIG_RD_ZSTD=m\n") is Compression.NONE


def test_dynamic_busybox_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="dynamically linked"):
        check_static_busybox(Path("/bin/ls"))
    text = tmp_path / "busybox"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(InvalidInputError, match="not an ELF"):
        check_static_busybox(text)


# --- package resolution failures ---------------------------------------------------------------------------------


def test_unknown_package_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="apt does not know package 'linux-image-no-such-banger'"):
        debian.build_debian_kernel(
            tmp_path / "out", package="linux-image-no-such-banger", cache_dir=tmp_path, progress=no_progress
        )
    assert not (tmp_path / "out").exists()


def test_non_kernel_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a Debian kernel image package"):
        debian.build_debian_kernel(tmp_path / "out", package="busybox-static", cache_dir=tmp_path, progress=no_progress)


def test_metapackage_resolves_to_versioned_image() -> None:
    pkg = debian.resolve_image_package(debian.DEFAULT_PACKAGE)
    assert re.fullmatch(r"linux-image-\d+\.\d+\.\d+-\d+-cloud-amd64", pkg.name), pkg.name
    assert pkg.size > 1_000_000


def test_tampered_cached_deb_is_not_used(tmp_path: Path) -> None:
    pkg = debian.apt_candidate(debian.BUSYBOX_PACKAGE)
    (tmp_path / pkg.deb_name).write_bytes(b"not the package")
    deb = debian.fetch_deb(pkg, tmp_path, no_progress)
    assert sha256_file(deb) == pkg.sha256


# --- the real build ---------------------------------------------------------------------------------------------


def test_build_artifacts_and_manifest(debian_kernel: Path) -> None:
    # Exactly the build's products (+ the manifest the caller writes): no unpack leftovers.
    assert sorted(p.name for p in debian_kernel.iterdir()) == sorted(
        [CMDLINE, CONFIG, INITRD, "manifest.json", MODULES, VMLINUX]
    )
    manifest = read_manifest(debian_kernel)
    (version_dir,) = (debian_kernel / MODULES).iterdir()
    assert manifest.kernel_version == version_dir.name
    assert re.fullmatch(r"build:debian:\d+\.\d+\.\d+-\d+", manifest.source), manifest.source
    assert manifest.boots_on == {"firecracker": True, "qemu-microvm": True}
    assert manifest.sha256 == sha256_file(debian_kernel / VMLINUX)
    assert manifest.has_initrd and manifest.has_modules
    cmdline = (debian_kernel / CMDLINE).read_text().strip()
    assert manifest.cmdline == cmdline
    assert "console=ttyS0" in cmdline.split() and "panic=1" in cmdline.split()
    assert not any(word.startswith("ip=") for word in cmdline.split())
    upstream = manifest.source.removeprefix("build:debian:").split("-")[0]
    config = (debian_kernel / CONFIG).read_text()
    assert f"# Linux/x86 {upstream} Kernel Configuration" in config and "\nCONFIG_PVH=y\n" in config


def test_module_tree_is_indexed_and_complete(debian_kernel: Path) -> None:
    (version_dir,) = (debian_kernel / MODULES).iterdir()
    assert (version_dir / "modules.dep.bin").is_file() and (version_dir / "modules.alias").is_file()
    deps = read_modules_dep(version_dir)
    assert len(deps) > 500
    missing = [p for module, needs in deps.items() for p in (module, *needs) if not (version_dir / p).is_file()]
    assert missing == []


def test_initramfs_contents(debian_kernel: Path) -> None:
    (version_dir,) = (debian_kernel / MODULES).iterdir()
    compressed = (debian_kernel / INITRD).read_bytes()
    assert compressed.startswith(b"\x28\xb5\x2f\xfd"), "the cloud kernel has CONFIG_RD_ZSTD=y, so zstd is expected"
    archive = zstandard.ZstdDecompressor().decompress(compressed)
    names = _cpio_list(archive)
    for required in ("init", "bin/busybox", "bin/sh", "bin/switch_root", "dev/console", LOAD_ORDER):
        assert required in names
    lines = [line.split() for line in _extract_member(archive, LOAD_ORDER).decode().splitlines() if line]
    order = [words[0] for words in lines]
    assert all(words[1:] in ([], ["optional"]) for words in lines)
    loaded_names = {Path(p).name.removesuffix(".ko").replace("-", "_") for p in order}
    assert {"virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "vmw_vsock_virtio_transport"} <= loaded_names
    deps = read_modules_dep(version_dir)
    for i, module in enumerate(order):
        assert set(deps[module]) <= set(order[:i]), f"{module} loaded before its dependencies"
        assert f"lib/modules/{module}" in names
    sample = order[-1]
    assert _extract_member(archive, f"lib/modules/{sample}") == (version_dir / sample).read_bytes()


def _extract_member(archive: bytes, name: str) -> bytes:
    return proc.run(["cpio", "-i", "--quiet", "--to-stdout", name], input=archive).stdout


def test_initramfs_is_reproducible(debian_kernel: Path, static_busybox: Path, tmp_path: Path) -> None:
    (version_dir,) = (debian_kernel / MODULES).iterdir()
    config = (debian_kernel / CONFIG).read_text()
    digests = set()
    for i in range(2):
        out = tmp_path / f"initrd-{i}"
        build_initramfs(out, modules_dir=version_dir, busybox=static_busybox, config_text=config)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    assert len(INITRAMFS_MODULES) >= 5


# --- real boots under QEMU microvm (TCG) --------------------------------------------------------------------------

ROOT_INIT = f"""#!/bin/busybox sh
/bin/busybox echo "{ROOT_MARKER} pid=$$"
/bin/busybox echo "drivers: $(/bin/busybox ls /sys/bus/virtio/drivers | /bin/busybox tr '\\n' ' ')"
/bin/busybox grep ' / ' /proc/mounts
/bin/busybox poweroff -f
"""


@pytest.mark.vm
def test_boot_reaches_root_init(
    debian_kernel: Path, static_busybox: Path, tmp_path: Path, microvm_boot: BootFn
) -> None:
    disk = make_root_disk(tmp_path / "root.ext4", static_busybox, ROOT_INIT)
    result = microvm_boot(debian_kernel, disk)
    assert not result.timed_out
    console = result.console
    assert "banger-initramfs: started" in console
    assert re.search(r"banger-initramfs: loaded \d+ modules", console)
    assert "banger-initramfs: switching root to /dev/vda (rw), init /sbin/init" in console
    assert f"{ROOT_MARKER} pid=1" in console
    drivers = re.search(r"^drivers: (.*)$", console, re.M)
    assert drivers is not None
    assert {"virtio_blk", "virtio_net", "virtio_console", "vmw_vsock_virtio_transport"} <= set(drivers.group(1).split())
    assert re.search(r"^/dev/vda / ext4 rw", console, re.M)
    assert "ERROR" not in console


@pytest.mark.vm
def test_missing_root_device_is_a_clear_error(
    debian_kernel: Path, static_busybox: Path, tmp_path: Path, microvm_boot: BootFn
) -> None:
    disk = make_root_disk(tmp_path / "root.ext4", static_busybox, ROOT_INIT)
    result = microvm_boot(debian_kernel, disk, append="root=/dev/vdz banger.rootwait=2")
    assert not result.timed_out, "the initramfs must power off on failure, not hang"
    assert (
        "banger-initramfs: ERROR: root device /dev/vdz did not appear within 2s (block devices: vda )" in result.console
    )
    assert "banger-initramfs: powering off" in result.console
    assert ROOT_MARKER not in result.console


@pytest.mark.vm
def test_empty_root_disk_is_a_clear_error(debian_kernel: Path, tmp_path: Path, microvm_boot: BootFn) -> None:
    disk = tmp_path / "empty.img"
    disk.write_bytes(b"\x00" * (8 << 20))
    result = microvm_boot(debian_kernel, disk)
    assert not result.timed_out
    assert "banger-initramfs: ERROR: cannot mount root /dev/vda" in result.console
    assert "switching root" not in result.console


@pytest.mark.vm
def test_missing_init_is_a_clear_error(
    debian_kernel: Path, static_busybox: Path, tmp_path: Path, microvm_boot: BootFn
) -> None:
    disk = make_root_disk(tmp_path / "root.ext4", static_busybox, ROOT_INIT)
    result = microvm_boot(debian_kernel, disk, append="init=/sbin/not-there")
    assert not result.timed_out
    assert (
        "banger-initramfs: ERROR: init /sbin/not-there not found or not executable on root /dev/vda" in result.console
    )
    assert ROOT_MARKER not in result.console


@pytest.mark.vm
def test_generic_kernel_package_boots_with_modular_ext4(
    static_busybox: Path, tmp_path: Path, microvm_boot: BootFn
) -> None:
    # linux-image-amd64 builds ext4 and crc32c as modules: the initramfs must load ext4's hard dependencies and
    # its crypto soft dependency, and shrug off crc32c-intel where the (TCG) CPU lacks SSE4.2.
    kernel = build_cached_kernel("linux-image-amd64").dir
    assert "\nCONFIG_EXT4_FS=m\n" in (kernel / CONFIG).read_text()
    disk = make_root_disk(tmp_path / "root.ext4", static_busybox, ROOT_INIT)
    result = microvm_boot(kernel, disk)
    assert not result.timed_out
    assert f"{ROOT_MARKER} pid=1" in result.console
    assert "ERROR" not in result.console
