"""What a killed `vm create` leaves is removed at the next daemon start, and nothing else is."""

from __future__ import annotations

from pathlib import Path

from banger.vms import sweep


def test_only_directories_of_unknown_vm_ids_are_removed(tmp_path: Path) -> None:
    vms, run = tmp_path / "vms", tmp_path / "run"
    for d in (vms / "aaaaaaaaaaaa", vms / "bbbbbbbbbbbb", run / "bbbbbbbbbbbb", vms / "not-a-vm", run / "net"):
        d.mkdir(parents=True)
        (d / "file").write_text("x")
    (run / "bangerd.sock").write_text("")
    sweep.remove_orphans((vms, run, tmp_path / "missing"), known_ids={"aaaaaaaaaaaa"})
    assert sorted(p.name for p in vms.iterdir()) == ["aaaaaaaaaaaa", "not-a-vm"]
    assert sorted(p.name for p in run.iterdir()) == ["bangerd.sock", "net"]


def test_stale_temporaries_inside_vm_directories_are_removed(tmp_path: Path) -> None:
    vdir = tmp_path / "aaaaaaaaaaaa"
    (vdir / ".seed.ext4.stage.tmp").mkdir(parents=True)
    (vdir / ".seed.ext4.123.tmp").write_text("half")
    (vdir / "root.ext4.tmp").write_text("half")
    (vdir / "root.ext4").write_text("disk")
    (vdir / "console.log").write_text("log")
    sweep.remove_stale_temps([vdir, tmp_path / "gone"])
    assert sorted(p.name for p in vdir.iterdir()) == ["console.log", "root.ext4"]
