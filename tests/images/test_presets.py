"""Exact bootstrap argv for every preset (Alpine and Void cannot reach a mirror here, so argv is what is tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.errors import InvalidInputError, UnsupportedError
from banger.images.build import cache_key
from banger.images.presets import (
    BootstrapOutput,
    Preset,
    bootstrap_command,
    debian_mirror_from_apt,
    make_plan,
)

TARGET = Path("/stage/out")
DEB_PKGS = "ca-certificates,git,iproute2,openssh-server,procps,python3,rsync,util-linux"
EXCLUDES = [
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
]


def test_debian_argv_root_mode_with_mirror_override() -> None:
    plan = make_plan(
        Preset.DEBIAN, suite="trixie", mirror="http://mirror.example/debian/", packages=("git",), arch="x86_64"
    )
    cmd = bootstrap_command(plan, TARGET, as_root=True)
    assert cmd.argv == [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        "--architectures=amd64",
        f"--include={DEB_PKGS}",
        *EXCLUDES,
        "trixie",
        "/stage/out",
        "http://mirror.example/debian",
    ]
    assert cmd.output is BootstrapOutput.TAR
    assert cmd.env == {}


def test_debian_argv_unshare_mode_and_defaults() -> None:
    plan = make_plan(Preset.DEBIAN, mirror="http://deb.example/debian", arch="aarch64")
    cmd = bootstrap_command(plan, TARGET, as_root=False)
    assert cmd.argv[2] == "--mode=unshare"
    assert "--architectures=arm64" in cmd.argv
    assert cmd.argv[-3:] == ["bookworm", "/stage/out", "http://deb.example/debian"]
    assert "--include=ca-certificates,git,iproute2,openssh-server,procps,python3,rsync,util-linux" in cmd.argv


def test_alpine_argv_default_and_mirror_override(tmp_path: Path) -> None:
    plan = make_plan(Preset.ALPINE, arch="x86_64")
    cmd = bootstrap_command(plan, TARGET, as_root=True)
    cdn = "https://dl-cdn.alpinelinux.org/alpine/v3.20"
    assert cmd.argv == [
        "apk.static",
        "--root",
        "/stage/out",
        "--initdb",
        "--no-cache",
        "--arch",
        "x86_64",
        "--keys-dir",
        "/etc/apk/keys",
        "--repository",
        f"{cdn}/main",
        "--repository",
        f"{cdn}/community",
        "add",
        "alpine-base",
        "ca-certificates",
        "iproute2",
        "procps",
        "python3",
        "util-linux",
    ]
    assert cmd.output is BootstrapOutput.DIR
    plan = make_plan(Preset.ALPINE, suite="edge", mirror="https://m.example/alpine/", keys_dir=tmp_path, arch="x86_64")
    cmd = bootstrap_command(plan, TARGET, as_root=True)
    assert cmd.argv[cmd.argv.index("--keys-dir") + 1] == str(tmp_path)
    assert [a for a in cmd.argv if a.startswith("https://")] == [
        "https://m.example/alpine/edge/main",
        "https://m.example/alpine/edge/community",
    ]
    assert cmd.keys_dir == tmp_path


def test_void_argv_glibc_and_musl_with_mirror_override() -> None:
    plan = make_plan(Preset.VOID, arch="x86_64")
    cmd = bootstrap_command(plan, TARGET, as_root=True)
    assert cmd.argv == [
        "xbps-install.static",
        "-S",
        "-y",
        "-R",
        "https://repo-default.voidlinux.org/current",
        "-r",
        "/stage/out",
        "base-minimal",
        "ca-certificates",
        "iproute2",
        "procps-ng",
        "python3",
        "util-linux",
    ]
    assert cmd.env == {"XBPS_ARCH": "x86_64"}
    assert cmd.keys_dir == Path("/var/db/xbps/keys")
    assert cmd.keys_into_root == Path("var/db/xbps/keys")
    plan = make_plan(Preset.VOID, suite="musl", mirror="https://v.example", arch="x86_64")
    cmd = bootstrap_command(plan, TARGET, as_root=True)
    assert cmd.argv[3:5] == ["-R", "https://v.example/current/musl"]
    assert cmd.env == {"XBPS_ARCH": "x86_64-musl"}
    with pytest.raises(InvalidInputError, match="glibc"):
        bootstrap_command(make_plan(Preset.VOID, suite="bookworm", arch="x86_64"), TARGET)


@pytest.mark.parametrize("bad", ["-oops", "a b", "x;y", "", "pkg,other"])
def test_bad_package_names_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="package"):
        make_plan(Preset.DEBIAN, packages=(bad,), mirror="http://x/debian")


def test_bad_suite_mirror_and_arch_refused() -> None:
    with pytest.raises(InvalidInputError, match="suite"):
        make_plan(Preset.DEBIAN, suite="--evil", mirror="http://x/debian")
    with pytest.raises(InvalidInputError, match="mirror"):
        make_plan(Preset.DEBIAN, mirror="deb.debian.org")
    with pytest.raises(UnsupportedError, match="architecture"):
        bootstrap_command(make_plan(Preset.DEBIAN, mirror="http://x/debian", arch="sparc"), TARGET)


def test_packages_merged_sorted_deduplicated() -> None:
    plan = make_plan(Preset.DEBIAN, packages=("vim", "python3", "git"), mirror="http://x/debian")
    assert plan.packages == (
        "ca-certificates",
        "git",
        "iproute2",
        "openssh-server",
        "procps",
        "python3",
        "rsync",
        "util-linux",
        "vim",
    )


def test_debian_mirror_read_from_apt_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-other.list").write_text("deb https://packages.example.com/apt cloud main\n")
    (d / "debian.sources").write_text(
        "Types: deb\n# URIs: http://commented.example/debian\nURIs: http://local.mirror/debian/\nSuites: bookworm\n"
    )
    assert debian_mirror_from_apt((tmp_path / "missing.list", d)) == "http://local.mirror/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("deb [arch=amd64] http://old.mirror/debian bookworm main\n")
    assert debian_mirror_from_apt((legacy,)) == "http://old.mirror/debian"
    (tmp_path / "empty.list").write_text("# nothing\n")
    assert debian_mirror_from_apt((tmp_path / "empty.list",)) is None


def test_cache_key_covers_every_input() -> None:
    base = dict(suite="bookworm", mirror="http://x/debian", packages=("git",), arch="x86_64")
    key = cache_key(make_plan(Preset.DEBIAN, **base))  # type: ignore[arg-type]
    assert key == cache_key(make_plan(Preset.DEBIAN, **base))  # type: ignore[arg-type]
    variants = [
        dict(base, suite="trixie"),
        dict(base, mirror="http://y/debian"),
        dict(base, packages=("vim",)),
        dict(base, arch="aarch64"),
    ]
    keys = {cache_key(make_plan(Preset.DEBIAN, **v)) for v in variants}  # type: ignore[arg-type]
    assert key not in keys and len(keys) == len(variants)
    # Package order does not matter.
    two = dict(base, packages=("git", "vim"))
    rev = dict(base, packages=("vim", "git"))
    assert cache_key(make_plan(Preset.DEBIAN, **two)) == cache_key(make_plan(Preset.DEBIAN, **rev))  # type: ignore[arg-type]
