"""Guest side of SSH: host keys made on first boot, the host's public keys authorized, sshd started (stdlib only).

Images carry no host keys (the image build removes them), so every VM makes its own the first time the host asks,
and they live on in its root disk. sshd daemonizes and is adopted by banger-init, so an agent restart leaves it be.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import subprocess
from typing import Any

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd")
KEYGEN_CANDIDATES = ("/usr/bin/ssh-keygen", "/bin/ssh-keygen")
HOST_KEYS = "/etc/ssh/ssh_host_*_key.pub"
PID_FILE = "/run/sshd.pid"
MARK = "# added by banger"
TOOL_TIMEOUT = 60.0


def _first(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None)


def _sshd_running() -> bool:
    try:
        with open(PID_FILE) as f:
            os.kill(int(f.read().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def merge_authorized(existing: str, keys: list[str]) -> str:
    """authorized_keys text with every key of `keys` present once; lines already there are kept as they are."""
    lines = existing.splitlines()
    have = {" ".join(line.split()[:2]) for line in lines if line.strip() and not line.startswith("#")}
    for key in keys:
        key = " ".join(key.split())
        if key and " ".join(key.split()[:2]) not in have:
            lines.append(f"{key} {MARK}" if MARK not in key else key)
            have.add(" ".join(key.split()[:2]))
    return "\n".join(lines) + ("\n" if lines else "")


def authorize(user: str, keys: list[str]) -> None:
    """Add `keys` to the user's ~/.ssh/authorized_keys (mode 0600, owned by the user)."""
    pw = pwd.getpwnam(user)
    ssh_dir = os.path.join(pw.pw_dir, ".ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
    path = os.path.join(ssh_dir, "authorized_keys")
    try:
        with open(path) as f:
            existing = f.read()
    except FileNotFoundError:
        existing = ""
    tmp = path + ".banger-tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(merge_authorized(existing, keys))
    os.chown(tmp, pw.pw_uid, pw.pw_gid)
    os.replace(tmp, path)


def setup(user: str, keys: list[str]) -> dict[str, Any]:
    """Make host keys if missing, authorize `keys`, start sshd; report whether sshd exists and the host keys."""
    sshd = _first(SSHD_CANDIDATES)
    if sshd is None:
        return {"sshd": False, "host_keys": []}
    keygen = _first(KEYGEN_CANDIDATES)
    if keygen is not None:
        subprocess.run([keygen, "-A"], capture_output=True, timeout=TOOL_TIMEOUT, check=False)
    if keys:
        authorize(user, keys)
    if not _sshd_running():
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        done = subprocess.run([sshd], capture_output=True, timeout=TOOL_TIMEOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"sshd did not start: {done.stderr.decode(errors='replace').strip()}")
    host_keys = []
    for path in sorted(glob.glob(HOST_KEYS)):
        with open(path) as f:
            host_keys.append(" ".join(f.read().split()[:2]))
    return {"sshd": True, "host_keys": host_keys}


async def handle_ssh(session: object, stream: object, frame: Any) -> dict[str, Any]:
    """SSH {keys, user} -> {sshd, host_keys}."""
    keys = frame.header.get("keys") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) and "\n" not in k for k in keys):
        raise ValueError("ssh keys must be a list of one-line strings")
    user = str(frame.header.get("user") or "root")
    return await asyncio.to_thread(setup, user, keys)
