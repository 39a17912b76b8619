"""Real Debian image builds with mmdebstrap against Debian's archive; contents checked with debugfs, never mounted."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from banger.errors import AlreadyExistsError, CancelledError, ConfigError, InvalidInputError, ToolError
from banger.images.build import build_image, cache_key, cached_rootfs, cached_tree, plan_for, prune_cache
from banger.images.guestside import stub_bytes
from banger.images.presets import Preset
from banger.images.spec import BuildStep, ImageSpec, MiB
from banger.progress import ProgressEvent

from .conftest import DEBIAN_SPEC, ROOTFS_CACHE
from .debugfs import cat, debugfs, exists, fsck_clean


class Recorder:
    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)

    @property
    def steps(self) -> list[str]:
        return [str(e.step) for e in self.events]


def test_debian_image_contents(debian_image: Path) -> None:
    assert cat(debian_image, "/sbin/banger-init") == stub_bytes()
    stub_stat = debugfs(debian_image, "stat /usr/sbin/banger-init")
    assert "Mode:  0755" in stub_stat and "User:     0" in stub_stat
    meta = json.loads(cat(debian_image, "/etc/banger/image.json"))
    assert meta["preset"] == "debian" and meta["suite"] == "bookworm" and meta["banger_version"]
    assert {"python3", "iproute2", "ca-certificates", "procps", "util-linux"} <= set(meta["packages"])
    assert cat(debian_image, "/etc/resolv.conf") == b""
    assert "Type: character special" in debugfs(debian_image, "stat /dev/console")
    for present in ("/usr/bin/python3", "/usr/lib/python3.11/asyncio/__init__.py", "/usr/sbin/ip", "/usr/bin/mount"):
        assert exists(debian_image, present), present
    # No systemd as init, and the host's files did not leak in.
    assert not exists(debian_image, "/usr/lib/systemd/systemd")
    assert not exists(debian_image, "/usr/share/doc/python3")
    assert cat(debian_image, "/etc/hostname") == b"banger\n"
    assert "Filesystem volume name:   BANGERROOT" in debugfs(debian_image, "stats")
    assert fsck_clean(debian_image)
    # Sparse: far fewer blocks allocated than the apparent 2 GiB.
    st = debian_image.stat()
    assert st.st_size == 2048 * MiB and st.st_blocks * 512 < st.st_size // 4


def test_warm_rebuild_reuses_cached_rootfs(debian_image: Path, tmp_path: Path) -> None:
    tar = cached_rootfs(ROOTFS_CACHE, cache_key(plan_for(DEBIAN_SPEC)))
    before = tar.stat()
    rec = Recorder()
    out = tmp_path / "warm.ext4"
    info = build_image(DEBIAN_SPEC, out, cache_dir=ROOTFS_CACHE, progress=rec)
    assert info.cache_hit
    assert BuildStep.BOOTSTRAP not in rec.steps and rec.steps.count(BuildStep.CACHE_HIT) == 1
    assert rec.steps[-1] == BuildStep.MKFS
    after = tar.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert cat(out, "/sbin/banger-init") == stub_bytes()
    assert cat(out, "/etc/hostname") == b"banger\n" and fsck_clean(out)
    assert [p.name for p in tmp_path.iterdir()] == ["warm.ext4"]
    # The build hard-linked the cached tree; writing the guest side must not have reached through to it.
    tree = cached_tree(tar)
    assert (tree / "usr/bin/python3").is_symlink() and not (tree / "usr/sbin/banger-init").exists()
    assert (tree / "etc/hostname").read_text() != "banger\n" and not (tree / "etc/banger").exists()


def test_unreachable_mirror_names_the_step_and_leaves_nothing(tmp_path: Path) -> None:
    cache, outdir = tmp_path / "cache", tmp_path / "images"
    spec = ImageSpec(name="broken", mirror="http://127.0.0.1:9/debian")
    rec = Recorder()
    with pytest.raises(ToolError) as exc:
        build_image(spec, outdir / "broken.ext4", cache_dir=cache, progress=rec)
    assert str(exc.value).startswith("bootstrap debian rootfs: mmdebstrap exited with")
    # The cause (apt's own words), not just mmdebstrap's closing lines.
    assert "Connection refused" in str(exc.value)
    assert set(rec.steps) == {BuildStep.BOOTSTRAP}
    assert any(e.message and e.message.startswith("I: running apt-get update") for e in rec.events)
    assert not outdir.exists() or list(outdir.iterdir()) == []
    assert [str(p.relative_to(cache)) for p in cache.rglob("*")] in ([], ["rootfs"])


def test_cancel_stops_mmdebstrap_and_leaves_nothing(tmp_path: Path) -> None:
    cache, outdir = tmp_path / "cache", tmp_path / "images"
    cancel = threading.Event()
    tempdirs: list[str] = []

    def on_event(event: ProgressEvent) -> None:
        msg = event.message or ""
        if msg.startswith("I: using /tmp/mmdebstrap."):
            tempdirs.append(msg.split()[2])
        if msg.startswith("I: running apt-get update"):
            cancel.set()

    started = time.monotonic()
    with pytest.raises(CancelledError, match="bootstrap debian rootfs: cancelled"):
        build_image(ImageSpec(name="c"), outdir / "c.ext4", cache_dir=cache, progress=on_event, cancel=cancel)
    assert time.monotonic() - started < 60
    assert tempdirs and not Path(tempdirs[0]).exists(), "mmdebstrap did not get to clean up its tempdir"
    assert tempdirs[0] not in Path("/proc/mounts").read_text()
    assert not outdir.exists() or list(outdir.iterdir()) == []
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_explicit_size_too_small_is_refused_cleanly(debian_image: Path, tmp_path: Path) -> None:
    spec = ImageSpec(name="tiny", size_bytes=128 * MiB)
    with pytest.raises(InvalidInputError, match="too small for this rootfs"):
        build_image(spec, tmp_path / "tiny.ext4", cache_dir=ROOTFS_CACHE, progress=Recorder())
    assert list(tmp_path.iterdir()) == []


def test_size_checked_against_the_real_rootfs(debian_image: Path, tmp_path: Path) -> None:
    # Bigger than the tarball, smaller than the rootfs plus ext4 overhead: caught after extraction, before mkfs.
    tar_mib = cached_rootfs(ROOTFS_CACHE, cache_key(plan_for(DEBIAN_SPEC))).stat().st_size // MiB
    spec = ImageSpec(name="snug", size_bytes=(tar_mib + 8) * MiB)
    rec = Recorder()
    with pytest.raises(InvalidInputError, match=r"too small for this rootfs \(needs about"):
        build_image(spec, tmp_path / "snug.ext4", cache_dir=ROOTFS_CACHE, progress=rec)
    assert BuildStep.EXTRACT in rec.steps and BuildStep.MKFS not in rec.steps
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "x.ext4"
    out.write_bytes(b"keep")
    with pytest.raises(AlreadyExistsError):
        build_image(ImageSpec(name="x"), out, cache_dir=tmp_path / "cache", progress=Recorder())
    assert out.read_bytes() == b"keep" and os.listdir(tmp_path) == ["x.ext4"]


def test_prune_cache_keeps_most_recently_used(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    for i, key in enumerate(["old", "mid", "new"]):
        (root / f"{key}.tar").write_bytes(b"t")
        (root / f"{key}.json").write_text("{}")
        (root / f"{key}.d").mkdir()
        os.utime(root / f"{key}.json", (1000 + i, 1000 + i))
    assert prune_cache(tmp_path, keep=2) == ["old"]
    assert sorted(p.name for p in root.iterdir()) == ["mid.d", "mid.json", "mid.tar", "new.d", "new.json", "new.tar"]
    assert prune_cache(tmp_path / "nothing", keep=1) == []


@pytest.mark.parametrize("preset", [Preset.ALPINE, Preset.VOID])
def test_other_presets_fail_clearly_without_their_tools_or_keys(preset: Preset, tmp_path: Path) -> None:
    # Neither apk.static/xbps-install.static nor an Alpine/Void mirror exists here: the errors must say what is missing.
    cache, outdir = tmp_path / "cache", tmp_path / "images"
    with pytest.raises(ConfigError, match="signing keys not found in /nonexistent-keys"):
        spec = ImageSpec(name="k", preset=preset, keys_dir=Path("/nonexistent-keys"))
        build_image(spec, outdir / "k.ext4", cache_dir=cache, progress=Recorder())
    keys = tmp_path / "keys"
    keys.mkdir()
    tool = "apk.static" if preset is Preset.ALPINE else "xbps-install.static"
    with pytest.raises(ToolError, match=f"required tool '{tool}' not found") as exc:
        spec = ImageSpec(name="t", preset=preset, keys_dir=keys)
        build_image(spec, outdir / "t.ext4", cache_dir=cache, progress=Recorder())
    assert exc.value.hint and tool in exc.value.hint
    assert not outdir.exists() or list(outdir.iterdir()) == []
    assert [p for p in cache.rglob("*") if p.is_file()] == []
