"""A VM's console log, written by a small process banger owns: capped and rotated whatever the guest prints.

The VMM writes the guest's serial output into a pipe; this process (one per VM) appends it to console.log and,
once that file would pass half the cap, renames it to console.log.1 (replacing the older half) and starts a new
one, so the two files together never exceed the cap. It runs in its own session and outlives the daemon, like
the VMM it serves; it exits when the VMM closes the pipe. Started as `python -m banger.drivers.consolelog`
(stdlib only, so it starts fast): it forks once and the parent exits at once, so it is never a child the
daemon has to reap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

READ_CHUNK = 64 * 1024
ROTATED_SUFFIX = ".1"
# Floor for the cap: each half must hold a useful amount of boot output.
MIN_MAX_BYTES = 64 * 1024
START_TIMEOUT = 30.0


def rotated(path: Path) -> Path:
    """Where the older half of a console log lives."""
    return path.with_name(path.name + ROTATED_SUFFIX)


class RotatingLog:
    """Appends to `path`, keeping `path` plus its rotated copy within `max_bytes` together."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.half = max(max_bytes, MIN_MAX_BYTES) // 2
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        if self._size > self.half:  # a log from an older banger, or a smaller cap since: keep its tail only
            with open(self.path, "rb") as old:
                old.seek(self._size - self.half)
                rotated(self.path).write_bytes(old.read())
            os.ftruncate(self._fd, 0)
            self._size = 0

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _rotate(self) -> None:
        os.close(self._fd)
        os.replace(self.path, rotated(self.path))
        self._fd = self._open()
        self._size = 0

    def write(self, data: bytes) -> None:
        """Append `data`, rotating first whenever it would not fit in the current half."""
        view = memoryview(data)
        while view:
            if self._size >= self.half:
                self._rotate()
            part = view[: self.half - self._size]
            written = os.write(self._fd, part)
            self._size += written
            view = view[written:]

    def close(self) -> None:
        os.close(self._fd)


def pump(source: int, log: RotatingLog) -> None:
    """Copy from `source` into the log until end of file."""
    while True:
        try:
            chunk = os.read(source, READ_CHUNK)
        except InterruptedError:
            continue
        if not chunk:
            return
        try:
            log.write(chunk)
        except OSError as exc:
            # A full disk must not stall the guest: drop output until writing works again.
            print(f"banger-consolelog: cannot write {log.path}: {exc}; dropping output", file=sys.stderr)


@dataclass(frozen=True)
class Writer:
    """A started writer: the write end of its pipe (pass it on, then close it) and its pid."""

    fd: int
    pid: int


def start(path: Path, max_bytes: int) -> Writer:
    """Start the writer for `path`; it exits once every copy of the returned pipe end is closed."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        argv = [sys.executable, "-m", "banger.drivers.consolelog", "--max-bytes", str(max_bytes), os.fspath(path)]
        done = subprocess.run(
            argv,
            stdin=read_end,
            capture_output=True,
            start_new_session=True,
            timeout=START_TIMEOUT,
            check=False,
            env={"PATH": os.defpath, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            cwd="/",
        )
        if done.returncode != 0 or not done.stdout.strip().isdigit():
            raise OSError(f"console log writer failed: {done.stderr.decode(errors='replace').strip()}")
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return Writer(write_end, int(done.stdout))


def main(argv: list[str] | None = None) -> int:
    """Entry point: detach, then copy stdin into the rotating log."""
    parser = argparse.ArgumentParser(prog="banger-consolelog")
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    log = RotatingLog(args.path, args.max_bytes)  # errors (no such directory) reach the starter
    child = os.fork()
    if child != 0:
        os.write(1, f"{child}\n".encode())
        os._exit(0)  # the starter waits for this parent only; the child is adopted by init
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the starter stopped reading our stderr
    try:
        pump(0, log)
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
