"""Image presets: how each distribution's root filesystem is bootstrapped, as exact argument lists.

Debian uses mmdebstrap, which needs no mounts or loop devices and writes the rootfs tarball itself.
Alpine uses apk.static (`--root DIR --initdb add ...`) and Void uses xbps-install.static (`-S -R REPO -r DIR ...`);
both fill a directory that banger then packs into the cached tarball.

How Alpine and Void were tried: no Alpine or Void mirror (nor their static tools) is reachable from the machine this
was written on, so their paths are covered by tests of the exact argv only (tests/images/test_presets.py), including
mirror overrides. Both refuse to run without the distribution's signing keys (`keys_dir`): apk gets `--keys-dir`, and
Void's keys are copied into `<root>/var/db/xbps/keys` first so `xbps-install -y` verifies the repository instead of
trusting it on first use. The Debian path is tested end to end against deb.debian.org.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from banger.errors import InvalidInputError, UnsupportedError


class Preset(StrEnum):
    """A distribution banger knows how to bootstrap."""

    DEBIAN = "debian"
    ALPINE = "alpine"
    VOID = "void"


class BootstrapOutput(StrEnum):
    """What a bootstrap command leaves behind: a tarball (Debian) or a filled directory (Alpine, Void)."""

    TAR = "tar"
    DIR = "dir"


# The guest side needs a full python3 (json, asyncio, pty), `ip`, CA roots, `ps`/`kill` and `mount`.
BASE_PACKAGES: dict[Preset, tuple[str, ...]] = {
    # openssh-server: `banger vm ssh` and `ssh NAME.vm` (host keys are removed from the image, made per VM);
    # git: workspaces; rsync: `rsync -e ssh` needs it on both ends.
    Preset.DEBIAN: ("python3", "iproute2", "ca-certificates", "procps", "util-linux", "git", "openssh-server", "rsync"),
    Preset.ALPINE: ("alpine-base", "python3", "iproute2", "ca-certificates", "procps", "util-linux"),
    Preset.VOID: ("base-minimal", "python3", "iproute2", "ca-certificates", "procps-ng", "util-linux"),
}

DEFAULT_SUITE: dict[Preset, str] = {
    Preset.DEBIAN: "bookworm",
    Preset.ALPINE: "v3.20",
    # Void has no releases; the "suite" picks the C library flavour of the rolling repository.
    Preset.VOID: "glibc",
}

FALLBACK_MIRROR: dict[Preset, str] = {
    Preset.DEBIAN: "http://deb.debian.org/debian",
    Preset.ALPINE: "https://dl-cdn.alpinelinux.org/alpine",
    Preset.VOID: "https://repo-default.voidlinux.org",
}

DEFAULT_KEYS_DIR: dict[Preset, Path] = {
    Preset.ALPINE: Path("/etc/apk/keys"),
    Preset.VOID: Path("/var/db/xbps/keys"),
}

_ARCH_NAMES: dict[str, dict[Preset, str]] = {
    "x86_64": {Preset.DEBIAN: "amd64", Preset.ALPINE: "x86_64", Preset.VOID: "x86_64"},
    "aarch64": {Preset.DEBIAN: "arm64", Preset.ALPINE: "aarch64", Preset.VOID: "aarch64"},
}

# Documentation and translations are dead weight in a VM image; dpkg skips them at unpack time.
DEBIAN_PATH_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")

APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
_PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._:=~-]*$")
_SUITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def host_arch() -> str:
    """The machine architecture (uname -m), which images are built for."""
    return platform.machine()


def arch_name(preset: Preset, arch: str) -> str:
    """The preset's own spelling of `arch` (amd64 for Debian, x86_64 for Alpine and Void)."""
    try:
        return _ARCH_NAMES[arch][preset]
    except KeyError:
        raise UnsupportedError(f"architecture {arch!r} is not supported (known: {', '.join(_ARCH_NAMES)})") from None


def debian_mirror_from_apt(sources: tuple[Path, ...] = APT_SOURCES) -> str | None:
    """The first Debian archive URI that apt on this host uses (security archives skipped), if any."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files.extend(sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources")))
        elif src.is_file():
            files.append(src)
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for uri in _uris(text, deb822=path.suffix == ".sources"):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return None


def _uris(text: str, *, deb822: bool) -> list[str]:
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if deb822 and line.lower().startswith("uris:"):
            out.extend(line.split(":", 1)[1].split())
        elif not deb822 and line.startswith("deb "):
            # "deb [opts] URI suite comp..." – the URI is the first word that looks like one.
            out.extend(w for w in line.split()[1:] if "://" in w)
    return out


def default_mirror(preset: Preset) -> str:
    """The mirror used when none is given: apt's own for Debian, the official CDN for the others."""
    if preset is Preset.DEBIAN:
        return debian_mirror_from_apt() or FALLBACK_MIRROR[preset]
    return FALLBACK_MIRROR[preset]


def validate_packages(packages: tuple[str, ...]) -> None:
    """Reject package names that could be read as options or carry separators."""
    for pkg in packages:
        if not _PACKAGE_RE.match(pkg):
            raise InvalidInputError(f"invalid package name {pkg!r}")


def validate_suite(suite: str) -> None:
    """Reject suite names that are not a single plain word."""
    if not _SUITE_RE.match(suite):
        raise InvalidInputError(f"invalid suite name {suite!r}")


@dataclass(frozen=True)
class BootstrapCommand:
    """One bootstrap invocation: the argv, extra environment, and what it produces at `target`."""

    argv: list[str]
    output: BootstrapOutput
    env: dict[str, str] = field(default_factory=dict)
    # Signing keys the tool verifies the repository with; the build refuses to run without them.
    keys_dir: Path | None = None
    # Where inside the new root the keys are copied before running (Void reads them from there).
    keys_into_root: Path | None = None


@dataclass(frozen=True)
class BootstrapPlan:
    """Everything a preset's bootstrap depends on; also the input of the build cache key."""

    preset: Preset
    suite: str
    mirror: str
    packages: tuple[str, ...]
    arch: str
    keys_dir: Path | None = None


def debian_command(plan: BootstrapPlan, target: Path, *, as_root: bool) -> BootstrapCommand:
    """mmdebstrap writing a minbase tarball to `target` (root mode as root, unshare mode otherwise)."""
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        f"--mode={'root' if as_root else 'unshare'}",
        "--format=tar",
        f"--architectures={arch_name(Preset.DEBIAN, plan.arch)}",
        f"--include={','.join(plan.packages)}",
        *(f"--dpkgopt=path-exclude={p}" for p in DEBIAN_PATH_EXCLUDES),
        plan.suite,
        str(target),
        plan.mirror,
    ]
    return BootstrapCommand(argv=argv, output=BootstrapOutput.TAR)


def alpine_command(plan: BootstrapPlan, target: Path, *, as_root: bool) -> BootstrapCommand:
    """apk.static initialising a fresh root at `target` from the main and community repositories."""
    keys = plan.keys_dir or DEFAULT_KEYS_DIR[Preset.ALPINE]
    repo = f"{plan.mirror.rstrip('/')}/{plan.suite}"
    argv = [
        "apk.static",
        "--root",
        str(target),
        "--initdb",
        "--no-cache",
        "--arch",
        arch_name(Preset.ALPINE, plan.arch),
        "--keys-dir",
        str(keys),
        "--repository",
        f"{repo}/main",
        "--repository",
        f"{repo}/community",
        "add",
        *plan.packages,
    ]
    return BootstrapCommand(argv=argv, output=BootstrapOutput.DIR, keys_dir=keys)


def void_command(plan: BootstrapPlan, target: Path, *, as_root: bool) -> BootstrapCommand:
    """xbps-install.static syncing the repository index and installing into `target`."""
    if plan.suite not in ("glibc", "musl"):
        raise InvalidInputError(f"void suite must be 'glibc' or 'musl', not {plan.suite!r}")
    musl = plan.suite == "musl"
    repo = f"{plan.mirror.rstrip('/')}/current" + ("/musl" if musl else "")
    arch = arch_name(Preset.VOID, plan.arch) + ("-musl" if musl else "")
    keys = plan.keys_dir or DEFAULT_KEYS_DIR[Preset.VOID]
    argv = ["xbps-install.static", "-S", "-y", "-R", repo, "-r", str(target), *plan.packages]
    return BootstrapCommand(
        argv=argv,
        output=BootstrapOutput.DIR,
        env={"XBPS_ARCH": arch},
        keys_dir=keys,
        keys_into_root=Path("var/db/xbps/keys"),
    )


BOOTSTRAP_OUTPUT = {
    Preset.DEBIAN: BootstrapOutput.TAR,
    Preset.ALPINE: BootstrapOutput.DIR,
    Preset.VOID: BootstrapOutput.DIR,
}

BUILDERS = {
    Preset.DEBIAN: debian_command,
    Preset.ALPINE: alpine_command,
    Preset.VOID: void_command,
}


def bootstrap_command(plan: BootstrapPlan, target: Path, *, as_root: bool | None = None) -> BootstrapCommand:
    """The exact bootstrap invocation for `plan`, writing to `target`."""
    root = os.geteuid() == 0 if as_root is None else as_root
    return BUILDERS[plan.preset](plan, target, as_root=root)


def make_plan(
    preset: Preset,
    *,
    suite: str | None = None,
    mirror: str | None = None,
    packages: tuple[str, ...] = (),
    arch: str | None = None,
    keys_dir: Path | None = None,
) -> BootstrapPlan:
    """A validated plan: preset defaults filled in, base packages merged with extras (sorted, deduplicated)."""
    suite = suite or DEFAULT_SUITE[preset]
    validate_suite(suite)
    validate_packages(packages)
    mirror = (mirror or default_mirror(preset)).rstrip("/")
    if "://" not in mirror:
        raise InvalidInputError(f"mirror must be a URL (e.g. {FALLBACK_MIRROR[preset]}), not {mirror!r}")
    merged = tuple(sorted(set(BASE_PACKAGES[preset]) | set(packages)))
    return BootstrapPlan(
        preset=preset,
        suite=suite,
        mirror=mirror,
        packages=merged,
        arch=arch or host_arch(),
        keys_dir=keys_dir,
    )
