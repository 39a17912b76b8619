"""The console log writer banger owns: capped and rotated, detached from whoever started it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from banger.drivers import consolelog

CAP = 256 * 1024


def wait_gone(path: Path, timeout: float = 10.0) -> None:
    """Wait until no process holds `path` open for writing (the writer exited after EOF)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = []
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            try:
                holders += [fd for fd in fd_dir.iterdir() if os.readlink(fd) == str(path)]
            except OSError:
                continue
        if not holders:
            return
        time.sleep(0.05)
    raise AssertionError(f"the console log writer still holds {path}")


def total(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, consolelog.rotated(path)) if p.exists())


def test_flood_stays_within_the_cap_and_keeps_the_newest_output(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    fd = consolelog.start(log, CAP).fd
    try:
        for i in range(400):  # 400 lines of 8 KiB: about 12 times the cap
            os.write(fd, f"{i:08d}".encode() + b"x" * 8183 + b"\n")
    finally:
        os.close(fd)
    wait_gone(log)
    assert total(log) <= CAP
    assert log.stat().st_size <= CAP // 2 and consolelog.rotated(log).stat().st_size <= CAP // 2
    newest = log.read_bytes().splitlines()[-1]
    assert newest.startswith(b"00000399")  # the tail survives rotation, not the start


def test_the_writer_is_not_a_child_of_its_starter(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    writer = consolelog.start(log, CAP)
    fd = writer.fd
    try:
        assert Path(f"/proc/{writer.pid}/cmdline").read_bytes().find(b"banger.drivers.consolelog") > 0
        os.write(fd, b"hello\n")
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        for pid in children:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"banger.drivers.consolelog" not in cmdline  # nothing for the daemon to reap
    finally:
        os.close(fd)
    wait_gone(log)
    assert log.read_bytes() == b"hello\n"


def test_an_oversized_old_log_is_rotated_at_start(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"old\n" * CAP)
    os.close(consolelog.start(log, CAP).fd)
    wait_gone(log)
    assert log.stat().st_size == 0
    assert consolelog.rotated(log).read_bytes() == b"old\n" * (CAP // 8)  # its newest half of the cap
    assert total(log) <= CAP


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    try:
        consolelog.start(tmp_path / "nope" / "console.log", CAP)
    except OSError as exc:
        assert "console log writer failed" in str(exc)
    else:
        raise AssertionError("started a writer for a log it cannot create")
