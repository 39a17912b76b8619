"""import_kernel, write_bundle (and its byte-for-byte round trip through pull), remove_kernel_dir, the lock file."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from banger.errors import AlreadyExistsError, DownloadError, InvalidInputError, NotFoundError
from banger.fsutil import sha256_file
from banger.kernels.localops import import_kernel, remove_kernel_dir, write_bundle
from banger.kernels.manifest import read_manifest
from banger.kernels.pull import pull_kernel
from banger.progress import ProgressEvent
from tests.kernels.pull.conftest import FAKE_VMLINUX, LoopbackServer, Route, entry_for, snapshot


def make_source(root: Path, *, banner: bool = True) -> Path:
    src = root / "src-kernel"
    mods = src / "modules" / "6.1.99-src"
    (mods / "kernel/drivers").mkdir(parents=True)
    vmlinux = FAKE_VMLINUX if banner else FAKE_VMLINUX.replace(b"Linux version", b"Linux-ish vers")
    (src / "vmlinux").write_bytes(vmlinux)
    (src / "config").write_text("CONFIG_X=y\n")
    (src / "initrd.img").write_bytes(os.urandom(5000))
    (src / "cmdline").write_text("console=ttyS0\n")
    (mods / "modules.dep").write_text("kernel/drivers/a.ko:\n")
    (mods / "kernel/drivers/a.ko").write_bytes(os.urandom(7000))
    os.symlink("kernel/drivers", mods / "drivers")
    os.symlink("/usr/src/linux-headers-6.1.99", mods / "build")  # leaves the tree: dropped on import
    return src


def tree_without_manifest(root: Path) -> dict[str, tuple[str, bytes]]:
    return {k: v for k, v in snapshot(root).items() if k != "manifest.json"}


def test_import_dir_reads_version_and_keeps_layout(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    os.mkfifo(src / "modules/6.1.99-src/pipe")
    kernels = tmp_path / "kernels"
    events: list[ProgressEvent] = []
    m = asyncio.run(import_kernel(src, kernels, name="mine", distro="debian", progress=events.append))
    k = kernels / "mine"
    assert m == read_manifest(k)
    assert m.kernel_version == "6.1.99-test"  # from the vmlinux banner
    assert (m.distro, m.arch, m.source) == ("debian", "x86_64", f"import:{src}")
    assert m.sha256 == sha256_file(k / "vmlinux")
    assert m.has_initrd and m.has_modules and m.cmdline == "console=ttyS0"
    assert os.readlink(k / "modules/6.1.99-src/drivers") == "kernel/drivers"
    assert not (k / "modules/6.1.99-src/build").is_symlink()
    assert not (k / "modules/6.1.99-src/pipe").exists()
    assert any(e.message and "left out 2" in e.message for e in events)
    assert (k / "initrd.img").read_bytes() == (src / "initrd.img").read_bytes()
    assert sorted(os.listdir(kernels)) == ["mine"]


def test_import_version_fallbacks(tmp_path: Path) -> None:
    src = make_source(tmp_path, banner=False)
    kernels = tmp_path / "kernels"
    assert asyncio.run(import_kernel(src, kernels, name="a")).kernel_version == "6.1.99-src"
    assert asyncio.run(import_kernel(src, kernels, name="b", kernel_version="9.9")).kernel_version == "9.9"
    bare = tmp_path / "bare-vmlinux"
    bare.write_bytes((src / "vmlinux").read_bytes())
    m = asyncio.run(import_kernel(bare, kernels, name="c"))
    assert (m.kernel_version, m.distro, m.has_modules) == ("unknown", "custom", False)
    assert sorted(os.listdir(kernels / "c")) == ["manifest.json", "vmlinux"]


def test_import_refusals_leave_kernels_dir_unchanged(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    kernels = tmp_path / "kernels"
    asyncio.run(import_kernel(src, kernels, name="k"))
    before = snapshot(kernels)
    with pytest.raises(AlreadyExistsError):
        asyncio.run(import_kernel(src, kernels, name="k"))
    bz = tmp_path / "bzImage"
    bz.write_bytes(b"MZ" + os.urandom(1000))
    with pytest.raises(InvalidInputError, match="ELF"):
        asyncio.run(import_kernel(bz, kernels, name="bz"))
    with pytest.raises(NotFoundError):
        asyncio.run(import_kernel(tmp_path / "nope", kernels, name="n"))
    with pytest.raises(InvalidInputError, match="invalid kernel name"):
        asyncio.run(import_kernel(src, kernels, name="../evil"))
    assert snapshot(kernels) == before
    m = asyncio.run(import_kernel(src, kernels, name="k", force=True, kernel_version="2"))
    assert m.kernel_version == "2" and read_manifest(kernels / "k").kernel_version == "2"


def test_bundle_is_deterministic_and_pull_reproduces_kernel(http_server: LoopbackServer, tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    asyncio.run(import_kernel(make_source(tmp_path), kernels, name="orig"))
    # As a distro build may leave it: an absolute symlink and a FIFO, which a bundle must not carry.
    os.symlink("/usr/src/linux-headers", kernels / "orig/modules/6.1.99-src/build")
    os.mkfifo(kernels / "orig/modules/6.1.99-src/fifo")
    sha1, size1 = write_bundle(kernels / "orig", tmp_path / "one.tar.zst")
    sha2, size2 = write_bundle(kernels / "orig", tmp_path / "two.tar.zst")
    assert (sha1, size1) == (sha2, size2)
    data = (tmp_path / "one.tar.zst").read_bytes()
    assert (sha256_file(tmp_path / "one.tar.zst"), len(data)) == (sha1, size1)
    names = _member_names(data)
    assert names[0] == "vmlinux" and "manifest.json" not in names
    url = http_server.add("/orig.tar.zst", Route(body=data))
    pulled = asyncio.run(pull_kernel(entry_for("copy", url, data, sha1), kernels))
    (kernels / "orig/modules/6.1.99-src/build").unlink()
    (kernels / "orig/modules/6.1.99-src/fifo").unlink()
    assert tree_without_manifest(kernels / "copy") == tree_without_manifest(kernels / "orig")
    assert pulled.sha256 == read_manifest(kernels / "orig").sha256


def _member_names(bundle: bytes) -> list[str]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bundle)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    return [m.name for m in members]


def test_write_bundle_refuses_dir_without_vmlinux(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    with pytest.raises(InvalidInputError, match="no vmlinux"):
        write_bundle(tmp_path / "k", tmp_path / "out.tar.zst")
    assert sorted(os.listdir(tmp_path)) == ["k"]


def test_remove_kernel_dir(tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    asyncio.run(import_kernel(make_source(tmp_path), kernels, name="gone"))
    asyncio.run(remove_kernel_dir(kernels, "gone"))
    assert os.listdir(kernels) == []
    with pytest.raises(NotFoundError, match="not installed"):
        asyncio.run(remove_kernel_dir(kernels, "gone"))
    assert os.listdir(kernels) == []


def test_bundle_pulls_from_file_url(tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    asyncio.run(import_kernel(make_source(tmp_path), kernels, name="orig"))
    out = tmp_path / "my bundle.tar.zst"
    sha, size = write_bundle(kernels / "orig", out)
    entry = entry_for("local", out.as_uri(), out.read_bytes(), sha)
    assert entry.size_bytes == size and "%20" in entry.tarball_url
    manifest = asyncio.run(pull_kernel(entry, kernels))
    assert manifest.source == f"pull:{out.as_uri()}"
    assert tree_without_manifest(kernels / "local") == tree_without_manifest(kernels / "orig")
    with pytest.raises(DownloadError, match="cannot read"):
        asyncio.run(pull_kernel(entry_for("nope", (tmp_path / "missing.tar.zst").as_uri(), b""), kernels))
    assert sorted(os.listdir(kernels)) == ["local", "orig"]


def test_cancelled_import_leaves_nothing(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    many = src / "modules/6.1.99-src/kernel/many"
    many.mkdir()
    for i in range(800):
        (many / f"m{i}.ko").write_bytes(b"x" * 2000)
    kernels = tmp_path / "kernels"

    async def scenario() -> None:
        task: asyncio.Task[object] | None = None

        def on_progress(event: ProgressEvent) -> None:
            if event.step.startswith("copying") and task is not None:
                asyncio.get_running_loop().call_later(0.02, task.cancel)

        task = asyncio.create_task(import_kernel(src, kernels, name="big", progress=on_progress))
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert os.listdir(kernels) == []
