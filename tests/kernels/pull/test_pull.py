"""`pull_kernel` against a real loopback HTTP server: the happy path, every refusal, failures and concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from banger import proc
from banger.errors import (
    AlreadyExistsError,
    BusyError,
    DownloadError,
    IntegrityError,
    InvalidInputError,
    UnsafeArchiveError,
)
from banger.fsutil import sha256_file
from banger.kernels.bulkhttp import tls_context
from banger.kernels.manifest import read_manifest
from banger.kernels.pull import ZstdFrameWalker, pull_kernel
from banger.progress import ProgressEvent
from tests.kernels.pull.conftest import (
    FAKE_VMLINUX,
    LoopbackServer,
    Route,
    entry_for,
    good_members,
    reg,
    snapshot,
    special,
    tar_bytes,
    zst,
)


def serve(
    server: LoopbackServer, name: str, bundle: bytes, *, stall_after: int | None = None, close_after: int | None = None
) -> str:
    return server.add(f"/{name}.tar.zst", Route(body=bundle, stall_after=stall_after, close_after=close_after))


def test_good_pull_installs_kernel_and_manifest(http_server: LoopbackServer, tmp_path: Path) -> None:
    bundle = zst(tar_bytes(good_members()))
    entry = entry_for("deb", serve(http_server, "deb", bundle), bundle)
    events: list[ProgressEvent] = []
    manifest = asyncio.run(pull_kernel(entry, tmp_path, progress=events.append))
    k = tmp_path / "deb"
    assert sorted(os.listdir(tmp_path)) == ["deb"]
    assert (k / "vmlinux").read_bytes() == FAKE_VMLINUX
    assert (k / "cmdline").read_text() == "console=ttyS0 reboot=k\n"
    assert os.readlink(k / "modules/6.1.99/source") == "kernel"
    assert manifest == read_manifest(k)
    assert manifest.sha256 == hashlib.sha256(FAKE_VMLINUX).hexdigest() == sha256_file(k / "vmlinux")
    assert manifest.source == f"pull:{entry.tarball_url}"
    assert (manifest.name, manifest.distro, manifest.arch, manifest.kernel_version) == (
        "deb",
        "debian",
        "x86_64",
        "6.1.99",
    )
    assert manifest.has_modules and not manifest.has_initrd
    assert manifest.cmdline == "console=ttyS0 reboot=k"
    byte_events = [e for e in events if e.done is not None]
    assert byte_events[-1].done == byte_events[-1].total == len(bundle)
    assert all(e.unit == "B" for e in byte_events)


def test_pull_of_bundle_made_by_zstd_cli(http_server: LoopbackServer, tmp_path: Path) -> None:
    tar_path = tmp_path / "k.tar"
    tar_path.write_bytes(tar_bytes(good_members(os.urandom(300_000))))
    proc.run(["zstd", "-q", "-T0", "-19", str(tar_path), "-o", str(tmp_path / "k.tar.zst")], step="zstd")
    bundle = (tmp_path / "k.tar.zst").read_bytes()
    kernels = tmp_path / "kernels"
    manifest = asyncio.run(pull_kernel(entry_for("cli", serve(http_server, "cli", bundle), bundle), kernels))
    assert (kernels / "cli/vmlinux").read_bytes()[: len(FAKE_VMLINUX)] == FAKE_VMLINUX
    assert manifest.size_bytes > 300_000


def test_manifest_hashes_a_large_vmlinux_unpacked_last(http_server: LoopbackServer, tmp_path: Path) -> None:
    # Bundles list members sorted, so vmlinux comes after modules/; several MiB span many decoded chunks.
    members = good_members(os.urandom(5 << 20))
    bundle = zst(tar_bytes(members[1:] + members[:1]))
    manifest = asyncio.run(pull_kernel(entry_for("big", serve(http_server, "big", bundle), bundle), tmp_path))
    assert manifest.sha256 == sha256_file(tmp_path / "big/vmlinux")
    assert (tmp_path / "big/vmlinux").stat().st_size > 5 << 20


def test_existing_kernel_is_not_overwritten_without_force(http_server: LoopbackServer, tmp_path: Path) -> None:
    bundle = zst(tar_bytes(good_members()))
    entry = entry_for("k", serve(http_server, "k", bundle), bundle)
    asyncio.run(pull_kernel(entry, tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(AlreadyExistsError, match="already installed"):
        asyncio.run(pull_kernel(entry, tmp_path))
    assert snapshot(tmp_path) == before


def test_force_keeps_old_kernel_usable_until_new_one_is_complete(http_server: LoopbackServer, tmp_path: Path) -> None:
    old = zst(tar_bytes(good_members()))
    asyncio.run(pull_kernel(entry_for("k", serve(http_server, "old", old), old), tmp_path))
    old_vmlinux = (tmp_path / "k/vmlinux").read_bytes()
    new = zst(tar_bytes(good_members(os.urandom(2 << 20))))
    seen_old: list[bool] = []

    def check_old_intact(_event: ProgressEvent) -> None:
        seen_old.append((tmp_path / "k/vmlinux").read_bytes() == old_vmlinux)

    manifest = asyncio.run(
        pull_kernel(
            entry_for("k", serve(http_server, "new", new), new), tmp_path, force=True, progress=check_old_intact
        )
    )
    assert seen_old and all(seen_old)
    assert (tmp_path / "k/vmlinux").read_bytes() != old_vmlinux
    assert manifest.sha256 == sha256_file(tmp_path / "k/vmlinux")
    assert sorted(os.listdir(tmp_path)) == ["k"]


def test_failed_force_pull_leaves_old_kernel(http_server: LoopbackServer, tmp_path: Path) -> None:
    old = zst(tar_bytes(good_members()))
    asyncio.run(pull_kernel(entry_for("k", serve(http_server, "old", old), old), tmp_path))
    before = snapshot(tmp_path)
    bad = zst(tar_bytes([*good_members(), special("modules/dev", tarfile.CHRTYPE)]))
    with pytest.raises(UnsafeArchiveError):
        asyncio.run(pull_kernel(entry_for("k", serve(http_server, "bad", bad), bad), tmp_path, force=True))
    assert snapshot(tmp_path) == before


def _refusal_cases() -> list[object]:
    """(id, bundle, error, message part, hash matches the served bytes)."""
    good_tar = tar_bytes(good_members())
    good = zst(good_tar)
    bomb = zst(tar_bytes([reg("vmlinux", FAKE_VMLINUX), reg("modules/zeros", bytes(80 << 20))]))
    trailing_bomb = zst(good_tar + bytes(80 << 20))  # small members, then a flood after the end of the tar
    corrupt = bytearray(zst(tar_bytes(good_members(os.urandom(200_000)))))
    corrupt[len(corrupt) // 2] ^= 0xFF
    cases = [
        ("absolute", zst(tar_bytes([reg("/vmlinux", FAKE_VMLINUX)])), UnsafeArchiveError, "absolute", True),
        ("dotdot", zst(tar_bytes([reg("modules/../../x", b"")])), UnsafeArchiveError, "leaves", True),
        ("symlink-out", zst(tar_bytes([special("modules/l", b"2", "../../x")])), UnsafeArchiveError, "leaves", True),
        ("symlink-abs", zst(tar_bytes([special("modules/l", b"2", "/etc")])), UnsafeArchiveError, "absolute", True),
        ("hardlink-out", zst(tar_bytes([special("modules/h", b"1", "/etc/x")])), UnsafeArchiveError, "absolute", True),
        ("chr", zst(tar_bytes([special("modules/c", tarfile.CHRTYPE)])), UnsafeArchiveError, "device", True),
        ("fifo", zst(tar_bytes([special("modules/f", tarfile.FIFOTYPE)])), UnsafeArchiveError, "FIFO", True),
        ("sha-mismatch", good, IntegrityError, "sha256 mismatch", False),
        ("no-vmlinux", zst(tar_bytes([reg("config", b"x")])), InvalidInputError, "no vmlinux", True),
        ("vmlinux-link", zst(tar_bytes([special("vmlinux", b"2", "config")])), UnsafeArchiveError, "regular", True),
        ("not-elf", zst(tar_bytes([reg("vmlinux", b"MZ" + bytes(100))])), InvalidInputError, "ELF", True),
        ("bomb", bomb, UnsafeArchiveError, "more than", True),
        ("trailing-bomb", trailing_bomb, UnsafeArchiveError, "decompresses to more than", True),
        ("corrupt-zstd", bytes(corrupt), IntegrityError, "zstd", True),
        ("not-zstd", b"definitely not zstd" * 100, IntegrityError, "zstd", True),
        ("truncated-frame", good[:-7], IntegrityError, "truncated|not a valid tar", True),
        ("truncated-tar", zst(good_tar[:1024]), IntegrityError, "tar", True),
    ]
    return [pytest.param(*case, id=case[0]) for case in cases]


@pytest.mark.parametrize(("case", "bundle", "error", "needle", "hash_ok"), _refusal_cases())
def test_refusals_leave_kernels_dir_unchanged(
    http_server: LoopbackServer,
    tmp_path: Path,
    case: str,
    bundle: bytes,
    error: type[Exception],
    needle: str,
    hash_ok: bool,
) -> None:
    kernels = tmp_path / "kernels"
    (kernels / "other").mkdir(parents=True)
    (kernels / "other/vmlinux").write_bytes(FAKE_VMLINUX)
    before = snapshot(tmp_path)
    entry = entry_for("k", serve(http_server, case, bundle), bundle, None if hash_ok else "0" * 64)
    with pytest.raises(error, match=needle):
        asyncio.run(pull_kernel(entry, kernels))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_name_status_and_url(http_server: LoopbackServer, tmp_path: Path, status: int) -> None:
    url = http_server.add("/gone.tar.zst", Route(status=status))
    with pytest.raises(DownloadError) as err:
        asyncio.run(pull_kernel(entry_for("k", url, b"x"), tmp_path))
    assert str(status) in str(err.value) and url in str(err.value)
    assert snapshot(tmp_path) == {}


def test_server_closing_early_is_a_download_error(http_server: LoopbackServer, tmp_path: Path) -> None:
    bundle = zst(tar_bytes(good_members(os.urandom(1 << 20))))
    url = serve(http_server, "short", bundle, close_after=len(bundle) // 2)
    with pytest.raises(DownloadError, match="failed after"):
        asyncio.run(pull_kernel(entry_for("k", url, bundle), tmp_path))
    assert snapshot(tmp_path) == {}


async def _pull_then_cancel(route: Route, entry_url: str, bundle: bytes, kernels: Path) -> float:
    task = asyncio.create_task(pull_kernel(entry_for("k", entry_url, bundle), kernels))
    assert await asyncio.to_thread(route.stalled.wait, 10)
    await asyncio.sleep(0.2)  # let the client take in what was sent; the server now sends nothing more
    assert not task.done()
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - t0


def test_cancel_during_stalled_download_is_prompt_and_leaves_nothing(
    http_server: LoopbackServer, tmp_path: Path
) -> None:
    bundle = zst(tar_bytes(good_members(os.urandom(4 << 20))))
    url = serve(http_server, "stall", bundle, stall_after=len(bundle) // 2)
    elapsed = asyncio.run(_pull_then_cancel(http_server.routes["/stall.tar.zst"], url, bundle, tmp_path))
    assert elapsed < 1.0
    assert snapshot(tmp_path) == {}


def test_two_pulls_of_one_name_serialize(http_server: LoopbackServer, tmp_path: Path) -> None:
    bundle = zst(tar_bytes(good_members(os.urandom(2 << 20))))
    entry = entry_for("k", serve(http_server, "k", bundle), bundle)

    async def both() -> list[object]:
        return list(
            await asyncio.gather(pull_kernel(entry, tmp_path), pull_kernel(entry, tmp_path), return_exceptions=True)
        )

    results = asyncio.run(both())
    assert sum(isinstance(r, AlreadyExistsError) for r in results) == 1
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert sorted(os.listdir(tmp_path)) == ["k"]
    assert read_manifest(tmp_path / "k").sha256 == sha256_file(tmp_path / "k/vmlinux")


def test_busy_when_not_waiting(http_server: LoopbackServer, tmp_path: Path) -> None:
    bundle = zst(tar_bytes(good_members(os.urandom(1 << 20))))
    stalled = entry_for("k", serve(http_server, "stall", bundle, stall_after=1000), bundle)

    async def scenario() -> None:
        first = asyncio.create_task(pull_kernel(stalled, tmp_path))
        await asyncio.sleep(0.3)
        with pytest.raises(BusyError, match="busy"):
            await pull_kernel(stalled, tmp_path, wait=False)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(scenario())
    assert snapshot(tmp_path) == {}


def test_lock_is_honoured_across_processes(http_server: LoopbackServer, tmp_path: Path) -> None:
    bundle = zst(tar_bytes(good_members()))
    entry = entry_for("k", serve(http_server, "k", bundle), bundle)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys; f=open(sys.argv[1],'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
            "sys.stdin.read()",
            str(tmp_path / ".k.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(BusyError):
            asyncio.run(pull_kernel(entry, tmp_path, wait=False))
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    asyncio.run(pull_kernel(entry, tmp_path, wait=True))
    assert sorted(os.listdir(tmp_path)) == ["k"]


def test_frame_walker_needs_a_complete_frame() -> None:
    data = zst(b"hello" * 1000)
    walker = ZstdFrameWalker()
    walker.feed(data)
    walker.finish()
    assert walker.frames == 1
    for cut in (1, 5, len(data) // 2, len(data) - 1):
        partial = ZstdFrameWalker()
        for i in range(0, cut, 3):  # byte-dribbled, as a slow server would
            partial.feed(data[i : min(i + 3, cut)])
        with pytest.raises(IntegrityError, match="truncated"):
            partial.finish()
    two = ZstdFrameWalker()
    two.feed(data + data)
    two.finish()
    assert two.frames == 2
    with pytest.raises(IntegrityError, match="not zstd"):
        ZstdFrameWalker().feed(io.BytesIO(b"PK\x03\x04rest").read())


def test_refusal_is_prompt_even_if_server_then_stalls(http_server: LoopbackServer, tmp_path: Path) -> None:
    bad = zst(tar_bytes([special("modules/dev", tarfile.CHRTYPE), reg("vmlinux", os.urandom(4 << 20))]))
    url = serve(http_server, "bad-stall", bad, stall_after=len(bad) // 2)
    t0 = time.monotonic()
    with pytest.raises(UnsafeArchiveError, match="device"):
        asyncio.run(pull_kernel(entry_for("k", url, bad), tmp_path))
    assert time.monotonic() - t0 < 5  # not the 60 s read timeout
    assert snapshot(tmp_path) == {}


def test_pull_over_https(https_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = zst(tar_bytes(good_members(os.urandom(3 << 20))))
    url = serve(https_server, "tls", bundle)
    assert url.startswith("https://")
    kernels = tmp_path / "kernels"
    manifest = asyncio.run(pull_kernel(entry_for("tls", url, bundle), kernels))
    assert manifest.sha256 == sha256_file(kernels / "tls/vmlinux")
    assert sorted(os.listdir(kernels)) == ["tls"]
    monkeypatch.delenv("SSL_CERT_FILE")  # now the self-signed certificate is not trusted
    tls_context.cache_clear()
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        asyncio.run(pull_kernel(entry_for("untrusted", url, bundle), kernels))
    assert sorted(os.listdir(kernels)) == ["tls"]
