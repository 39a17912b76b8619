"""banger's side of every image, added to a staged rootfs: the init stub, /etc/banger/image.json, placeholders.

The stub (/sbin/banger-init, package data `files/banger-init`) is the kernel's init=. It only mounts the per-VM seed
drive and execs `python3 /run/banger/seed/init.py`, so the real guest init can change with banger releases without
rebuilding images. This module also checks that the rootfs can run it: /bin/sh, mount, and a full python3.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from importlib import resources
from pathlib import Path, PurePosixPath

from banger.errors import InvalidInputError
from banger.images.spec import ImageInfo

STUB_PATH = "sbin/banger-init"
IMAGE_JSON = "etc/banger/image.json"
RESOLV_CONF = "etc/resolv.conf"
HOSTNAME = "etc/hostname"
# The guest init's imports that python3-minimal (and other trimmed builds) lack.
REQUIRED_STDLIB = ("asyncio", "json", "pty.py")
# Guest-side helpers whose absence degrades, but does not break, the guest.
OPTIONAL_TOOLS = {"ip": "iproute2", "ps": "procps"}
# Needed before the stub mounts devtmpfs: the kernel opens /dev/console for init's stdio.
DEV_NODES = {"dev/console": (0o600, 5, 1), "dev/null": (0o666, 1, 3)}
_MAX_LINK_HOPS = 40


def stub_bytes() -> bytes:
    """The init stub's content (package data)."""
    return resources.files("banger.images").joinpath("files/banger-init").read_bytes()


def stub_sha256() -> str:
    """Hex sha256 of the init stub; part of every build cache key."""
    return hashlib.sha256(stub_bytes()).hexdigest()


def resolve_in_root(root: Path, guest_path: str) -> Path | None:
    """Follow `guest_path` inside `root` as the guest would (absolute links relative to `root`); None if dangling."""
    parts = list(PurePosixPath(guest_path).parts[1:])
    current = PurePosixPath("/")
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent
            continue
        if part == ".":
            continue
        candidate = current / part
        host = root / str(candidate).lstrip("/")
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_LINK_HOPS:
                return None
            link = PurePosixPath(os.readlink(host))
            parts = list(link.parts[1:] if link.is_absolute() else link.parts) + parts
            current = PurePosixPath("/") if link.is_absolute() else current
            continue
        current = candidate
    return root / str(current).lstrip("/")


def _find_tool(root: Path, tool: str) -> Path | None:
    for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        found = resolve_in_root(root, f"{d}/{tool}")
        if found is not None and found.is_file() and os.stat(found).st_mode & 0o111:
            return found
    return None


def _python_stdlib_missing(root: Path, python: Path) -> list[str]:
    name = python.name
    versions = [name] if name.startswith("python3.") else []
    lib_dirs = [root / "usr/lib" / v for v in versions] or sorted((root / "usr/lib").glob("python3.*"))
    lib_dirs += [root / "usr/local/lib" / v for v in versions] or sorted((root / "usr/local/lib").glob("python3.*"))
    for lib in lib_dirs:
        missing = [m for m in REQUIRED_STDLIB if not (lib / m).exists()]
        if not missing:
            return []
    return [m.removesuffix(".py") for m in REQUIRED_STDLIB]


def check_rootfs(root: Path) -> list[str]:
    """Refuse a rootfs the guest side cannot run on; return the optional tools it lacks."""
    if _find_tool(root, "sh") is None:
        raise InvalidInputError("rootfs has no /bin/sh: the init stub is a POSIX shell script")
    if _find_tool(root, "mount") is None:
        raise InvalidInputError("rootfs has no mount command: install util-linux (or busybox) in it")
    python = _find_tool(root, "python3")
    if python is None:
        raise InvalidInputError(
            "rootfs lacks python3 (no /usr/bin/python3 or /bin/python3): banger's guest agent needs it",
            hint="install the full python3 package in the rootfs (e.g. apt-get install python3, apk add python3)",
        )
    missing = _python_stdlib_missing(root, python)
    if missing:
        raise InvalidInputError(
            f"rootfs python3 lacks standard library modules {', '.join(missing)} (a python3-minimal build?)",
            hint="install the full python3 package, not python3-minimal",
        )
    return [pkg for tool, pkg in OPTIONAL_TOOLS.items() if _find_tool(root, tool) is None]


def _guest_dir(root: Path, guest_dir: str, depth: int = 0) -> Path:
    """The host path of directory `guest_dir` inside `root`, following in-root symlinks (merged /usr) and creating
    what is missing (including a dangling link's target); never a path outside `root`."""
    if depth > _MAX_LINK_HOPS:
        raise InvalidInputError(f"rootfs path {guest_dir} has too many levels of symlinks")
    current = PurePosixPath("/")
    for part in PurePosixPath(guest_dir).parts[1:]:
        candidate = current.parent if part == ".." else current / part
        host = root / str(candidate).lstrip("/")
        if host.is_symlink():
            link = PurePosixPath(os.readlink(host))
            target = link if link.is_absolute() else current / link
            resolved = _guest_dir(root, os.path.normpath(str(target)), depth + 1)
            current = PurePosixPath("/") / resolved.relative_to(root)
        elif not host.exists():
            host.mkdir(mode=0o755)
            current = candidate
        elif host.is_dir():
            current = candidate
        else:
            raise InvalidInputError(f"rootfs path {candidate} is not a directory")
    return root / str(current).lstrip("/")


def _write_guest_file(root: Path, guest_path: str, data: bytes, mode: int) -> None:
    path = _guest_dir(root, str(PurePosixPath(guest_path).parent)) / PurePosixPath(guest_path).name
    if path.is_dir() and not path.is_symlink():
        raise InvalidInputError(f"rootfs path {guest_path} is a directory")
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data)
    os.chmod(path, mode)
    os.chown(path, 0, 0)


def add_guest_side(root: Path, info: ImageInfo) -> None:
    """Install the init stub, image.json, device nodes and placeholder files into the staged rootfs `root`."""
    _write_guest_file(root, "/" + STUB_PATH, stub_bytes(), 0o755)
    payload = json.dumps(info.guest_json(), indent=2, sort_keys=True) + "\n"
    _write_guest_file(root, "/" + IMAGE_JSON, payload.encode(), 0o644)
    # The guest init writes resolv.conf and the hostname at boot; ship neutral placeholders, never the host's.
    _write_guest_file(root, "/" + RESOLV_CONF, b"", 0o644)
    _write_guest_file(root, "/" + HOSTNAME, b"banger\n", 0o644)
    # Host keys made while the image was built would be shared by every VM: each VM makes its own at first boot.
    ssh_etc = root / "etc" / "ssh"
    if ssh_etc.is_dir() and not ssh_etc.is_symlink():
        for key in ssh_etc.glob("ssh_host_*key*"):
            if key.is_file() or key.is_symlink():
                key.unlink()
    dev = root / "dev"
    if dev.is_symlink():
        raise InvalidInputError("rootfs has /dev as a symlink; refusing to write device nodes")
    dev.mkdir(mode=0o755, exist_ok=True)
    for rel, (mode, major, minor) in DEV_NODES.items():
        node = root / rel
        if node.is_symlink() or node.exists():
            node.unlink()
        os.mknod(node, mode | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(node, mode)
