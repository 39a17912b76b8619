"""Build a bootable guest kernel from Debian's kernel package: vmlinux, config, modules and banger's initramfs.

Nothing is installed on the host: the .deb is fetched with `apt-get download` (or taken from apt's archive cache),
checked against apt's index, and unpacked with `dpkg-deb -x`. The package's whole modules/<ver> tree is kept (about
90 MiB, indexed with depmod) so a guest can load any module later (netfilter, overlay, ...); the initramfs carries
only the virtio/vsock drivers needed to reach the root disk, and those stay loaded after switch_root.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from banger import proc
from banger.errors import IntegrityError, InvalidInputError, NotFoundError, ToolError
from banger.fsutil import atomic_write, dir_size, sha256_file
from banger.kernels.initramfs import build_initramfs
from banger.kernels.manifest import CMDLINE, CONFIG, INITRD, MODULES, VMLINUX, KernelManifest
from banger.kernels.vmlinux import extract_vmlinux, has_pvh_note, is_elf, read_kernel_version
from banger.progress import Progress, ProgressEvent

DEFAULT_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
APT_ARCHIVES = Path("/var/cache/apt/archives")
# Serial console for both VMMs (the 8250 driver is built in; hvc0 would need virtio_console, a module, so it could
# only appear after the initramfs ran). No ip= autoconfig: the guest configures its own network. No pci=off: the
# VMM may describe devices through ACPI, and the kernel's PCI probe of a PCI-less microvm costs next to nothing.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw"
_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
_APT_HINT = "run `apt-get update` so apt knows the current Debian packages"


@dataclass(frozen=True, slots=True)
class AptPackage:
    """One package as apt's index describes its candidate version."""

    name: str
    version: str
    architecture: str
    sha256: str
    size: int
    depends: str = ""

    @property
    def deb_name(self) -> str:
        """The file name `apt-get download` gives it (an epoch's colon is written %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


@dataclass(frozen=True, slots=True)
class DebianKernelBuild:
    """What build_debian_kernel produced in its out_dir."""

    kernel_version: str
    package: str  # the real image package, e.g. linux-image-6.1.0-56-cloud-amd64
    package_version: str
    arch: str
    sha256: str  # of vmlinux
    size_bytes: int
    cmdline: str
    boots_on: dict[str, bool] = field(default_factory=dict)
    initramfs_modules: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return f"build:debian:{self.package_version}"

    def manifest(self, name: str) -> KernelManifest:
        """The manifest record for installing this build under `name`."""
        return KernelManifest(
            name=name,
            distro="debian",
            arch=self.arch,
            kernel_version=self.kernel_version,
            sha256=self.sha256,
            source=self.source,
            size_bytes=self.size_bytes,
            boots_on=dict(self.boots_on),
            has_initrd=True,
            has_modules=True,
            cmdline=self.cmdline,
        )


def _fields(stanza: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in stanza.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "\t")):
            out[key.strip()] = value.strip()
    return out


def apt_candidate(name: str) -> AptPackage:
    """apt's candidate version of package `name`, with the index's size and SHA256."""
    out = proc.run([proc.which("apt-cache"), "show", "--no-all-versions", name], check=False, step=f"look up {name}")
    text = out.stdout.decode(errors="replace")
    if out.returncode != 0 or not text.strip():
        raise NotFoundError(f"apt does not know package {name!r}", hint=_APT_HINT)
    f = _fields(text.split("\n\n", 1)[0])
    try:
        return AptPackage(
            name=f["Package"],
            version=f["Version"],
            architecture=f["Architecture"],
            sha256=f["SHA256"],
            size=int(f["Size"]),
            depends=f.get("Depends", ""),
        )
    except (KeyError, ValueError) as exc:
        raise ToolError(f"apt-cache show {name}: unexpected output (missing {exc})") from exc


def resolve_image_package(name: str) -> AptPackage:
    """Follow a metapackage (linux-image-cloud-amd64) to the versioned image package it depends on."""
    pkg = apt_candidate(name)
    for _hop in range(4):
        target = next(
            (
                dep.split()[0]
                for dep in pkg.depends.replace("|", ",").split(",")
                if dep.strip().startswith("linux-image-")
            ),
            None,
        )
        if target is None:
            break
        pkg = apt_candidate(target)
    if not pkg.name.startswith("linux-image-"):
        raise InvalidInputError(f"{name!r} is not a Debian kernel image package (resolved to {pkg.name})")
    return pkg


def fetch_deb(pkg: AptPackage, cache_dir: Path, progress: Progress) -> Path:
    """A verified .deb of `pkg`: from apt's own archive cache, `cache_dir`, or `apt-get download`."""
    step = f"download {pkg.name} {pkg.version}"
    for where in (cache_dir / pkg.deb_name, APT_ARCHIVES / pkg.deb_name):
        if where.is_file() and sha256_file(where) == pkg.sha256:
            progress(ProgressEvent(step, done=pkg.size, total=pkg.size, message=f"cached at {where}"))
            return where
    progress(ProgressEvent(step, done=0, total=pkg.size))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=cache_dir) as tmp:
        # Root's apt-get download works without installing anything; apt verifies it against the signed index.
        proc.run(
            [proc.which("apt-get"), "download", f"{pkg.name}={pkg.version}"],
            cwd=tmp,
            step=f"apt-get download {pkg.name}",
            timeout=1800,
        )
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise ToolError(f"apt-get download {pkg.name} left {len(debs)} .deb files, expected one", hint=_APT_HINT)
        if sha256_file(debs[0]) != pkg.sha256:
            raise IntegrityError(f"{debs[0].name}: SHA256 differs from apt's index", hint=_APT_HINT)
        target = cache_dir / pkg.deb_name
        debs[0].replace(target)
    progress(ProgressEvent(step, done=pkg.size, total=pkg.size))
    return target


def _unpack(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proc.run([proc.which("dpkg-deb"), "-x", deb, dest], step=f"unpack {deb.name}", timeout=600)


def _modules_root(root: Path, version: str) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):
        candidate = root / base / version
        if candidate.is_dir():
            return candidate
    raise NotFoundError(f"the kernel package has no lib/modules/{version}")


def _depmod(root: Path, modules: Path, version: str) -> None:
    """Generate modules.dep & co. so the tree is usable by modprobe in the guest as well as by the initramfs."""
    if modules.parent.parent != root / "lib":
        # depmod -b always looks under <base>/lib/modules; give it that shape.
        (root / "lib").mkdir(exist_ok=True)
        modules.parent.rename(root / "lib" / "modules")
    tool = proc.which("depmod", hint="install the Debian package kmod")
    proc.run([tool, "-a", "-b", root, version], step="depmod", timeout=300)


def build_debian_kernel(
    out_dir: Path,
    *,
    package: str = DEFAULT_PACKAGE,
    cache_dir: Path,
    progress: Progress,
    cmdline: str = DEFAULT_CMDLINE,
) -> DebianKernelBuild:
    """Build vmlinux, config, modules/<ver>, initrd.img and cmdline from a Debian kernel package into `out_dir`.

    `out_dir` should be a fresh staging directory that the caller renames into place on success and deletes on
    failure (it may then hold some of the files). Blocking: run it in a worker thread from async code.
    """
    progress(ProgressEvent(f"resolve {package}"))
    pkg = resolve_image_package(package)
    busybox_pkg = apt_candidate(BUSYBOX_PACKAGE)
    kernel_deb = fetch_deb(pkg, cache_dir, progress)
    busybox_deb = fetch_deb(busybox_pkg, cache_dir, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Unpack inside out_dir: the module tree is then renamed (not copied) into place, and a failed build leaves
    # nothing beside out_dir for the caller to clean up.
    with tempfile.TemporaryDirectory(prefix=".unpack.", dir=out_dir) as tmp:
        root = Path(tmp) / "kernel"
        progress(ProgressEvent(f"unpack {kernel_deb.name}"))
        _unpack(kernel_deb, root)
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise InvalidInputError(f"{kernel_deb.name} holds {len(vmlinuz)} boot/vmlinuz-* files, expected one")
        version = vmlinuz[0].name.removeprefix("vmlinuz-")

        progress(ProgressEvent("extract vmlinux"))
        vmlinux = out_dir / VMLINUX
        extract_vmlinux(vmlinuz[0], vmlinux)
        if not is_elf(vmlinux):
            raise InvalidInputError(f"{vmlinuz[0].name}: extracted kernel is not ELF")
        banner = read_kernel_version(vmlinux)
        if banner != version:
            raise InvalidInputError(f"{vmlinuz[0].name}: kernel says it is {banner!r}, package says {version!r}")
        config_text = (root / "boot" / f"config-{version}").read_text()
        atomic_write(out_dir / CONFIG, config_text.encode())

        progress(ProgressEvent("index modules"))
        _depmod(root, _modules_root(root, version), version)
        modules_src = root / "lib" / "modules" / version

        progress(ProgressEvent("build initramfs"))
        bb_root = Path(tmp) / "busybox"
        _unpack(busybox_deb, bb_root)
        loaded = build_initramfs(
            out_dir / INITRD, modules_dir=modules_src, busybox=bb_root / "bin" / "busybox", config_text=config_text
        )
        (out_dir / MODULES).mkdir(exist_ok=True)
        shutil.move(modules_src, out_dir / MODULES / version)
    atomic_write(out_dir / CMDLINE, f"{cmdline}\n".encode())
    progress(ProgressEvent("done"))
    return DebianKernelBuild(
        kernel_version=version,
        package=pkg.name,
        package_version=pkg.version,
        arch=_ARCH.get(pkg.architecture, pkg.architecture),
        sha256=sha256_file(vmlinux),
        size_bytes=dir_size(out_dir),
        cmdline=cmdline,
        boots_on={"firecracker": is_elf(vmlinux), "qemu-microvm": has_pvh_note(vmlinux)},
        initramfs_modules=tuple(m.path for m in loaded),
    )


def build_inputs_digest() -> str:
    """A hash of the code and data that shape a build (for caches keyed by inputs)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for rel in ("debian.py", "initramfs.py", "vmlinux.py", "files/init"):
        h.update(rel.encode() + b"\x00" + (here / rel).read_bytes())
    return h.hexdigest()[:16]
