"""Fixtures shared by every test area: an isolated BANGER_HOME, a real bangerd, and the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.daemon.lock import lock_holder

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class BangerEnv:
    """A private state root plus helpers to drive the real `banger` CLI against it."""

    home: Path
    env: dict[str, str]
    # A command prefix such as ["ip", "netns", "exec", NS]: the CLI (and a daemon it starts) runs inside it.
    wrap: tuple[str, ...] = ()

    def cli(self, *args: str, check: bool = False, timeout: float = 120, input: str | None = None) -> CliResult:
        proc = subprocess.run(
            [*self.wrap, str(VENV_BIN / "banger"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        res = CliResult(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"banger {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return res

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.wrap, str(VENV_BIN / "banger"), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def socket(self) -> Path:
        return self.home / "run" / "bangerd.sock"

    def daemon_pid(self) -> int | None:
        """Pid of the daemon holding this root's lock (None when no daemon runs)."""
        pid = lock_holder(self.home / "run" / "bangerd.lock")
        return pid if pid and pid > 0 else None

    def stop_daemon(self) -> None:
        """Stop this root's daemon if one runs (SIGKILL if it does not stop)."""
        pid = self.daemon_pid()
        if pid:
            self.cli("daemon", "stop", timeout=60)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_text(self) -> str:
        path = self.home / "logs" / "bangerd.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def banger_env(tmp_path: Path) -> Iterator[BangerEnv]:
    """A fresh BANGER_HOME; any daemon started in it is stopped (or killed) at teardown."""
    home = tmp_path / "home"
    env = dict(os.environ)
    env["BANGER_HOME"] = str(home)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.pop("BANGER_NO_AUTOSTART", None)
    benv = BangerEnv(home=home, env=env)
    yield benv
    benv.stop_daemon()


@pytest.fixture
def daemon(banger_env: BangerEnv) -> BangerEnv:
    """A running bangerd for this test's state root."""
    banger_env.cli("daemon", "start", check=True)
    return banger_env
