"""The calling user's SSH files for banger: a client key pair and the known_hosts banger keeps (in their own home).

OpenSSH refuses private keys that others can read, and the daemon's state root is not the user's, so these live in
`${XDG_CONFIG_HOME:-~/.config}/banger/ssh/` and are written by the CLI as the user. The daemon only pins the guests'
host keys (reported by each guest's agent); the CLI copies the pins into known_hosts before ssh needs them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from banger import proc
from banger.errors import InvalidInputError, NotFoundError

KEY_NAME = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
MAX_PUB_KEYS = 32


def ssh_dir() -> Path:
    """~/.config/banger/ssh (or under $XDG_CONFIG_HOME)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "banger" / "ssh"


def client_key() -> Path:
    """The private key path (it may not exist yet)."""
    return ssh_dir() / KEY_NAME


def known_hosts() -> Path:
    return ssh_dir() / KNOWN_HOSTS


def ensure_client_key() -> Path:
    """Make the banger client key pair (ed25519, mode 0600) if missing; returns the private key path."""
    key = client_key()
    if key.exists():
        return key
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(key.parent, 0o700)
    keygen = proc.which("ssh-keygen", hint="install the openssh-client package")
    proc.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "banger", "-f", str(key)], step="make the SSH key")
    os.chmod(key, 0o600)
    return key


def _read_pub(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError as exc:
        raise InvalidInputError(f"cannot read SSH public key {path}: {exc.strerror}") from exc
    if "PRIVATE KEY" in text:
        raise InvalidInputError(f"{path} is a private key: give the .pub file")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise InvalidInputError(f"{path}: expected one OpenSSH public key line")
    return lines[0]


def public_keys(extra: tuple[str, ...] = ()) -> list[str]:
    """Keys to authorize: banger's client key (if made), the user's ~/.ssh/*.pub, and `--ssh-key` files."""
    keys: list[str] = []
    pub = client_key().with_suffix(".pub")
    if pub.exists():
        keys.append(_read_pub(pub))
    home_ssh = Path(os.path.expanduser("~")) / ".ssh"
    for path in sorted(home_ssh.glob("*.pub"))[:MAX_PUB_KEYS] if home_ssh.is_dir() else []:
        try:
            keys.append(_read_pub(path))
        except InvalidInputError:
            continue  # a stray file there is not the user asking for anything
    for name in extra:
        path = Path(name)
        if not path.exists():
            raise NotFoundError(f"--ssh-key {name}: no such file")
        keys.append(_read_pub(path))
    return list(dict.fromkeys(" ".join(k.split()[:2]) for k in keys))


def update_known_hosts(entries: list[dict[str, Any]], *, replace_all: bool = False) -> Path:
    """Write the pinned host keys of `entries` ({hosts, host_keys}) into banger's known_hosts (mode 0600)."""
    path = known_hosts()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = {h for e in entries for h in e["hosts"]}
    kept: list[str] = []
    if not replace_all and path.exists():
        for line in path.read_text().splitlines():
            hosts = set(line.split(" ", 1)[0].split(","))
            if line.strip() and not hosts & names:
                kept.append(line)
    for e in entries:
        kept += [f"{','.join(e['hosts'])} {key}" for key in e["host_keys"]]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
    return path


def banger_command() -> str:
    """How ssh's ProxyCommand runs this banger: its absolute path (or this interpreter with the CLI module)."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "banger":
        found = argv0 if os.sep in argv0 else shutil.which(argv0)
        if found:
            return os.path.abspath(found)
    return f"{sys.executable} -c 'from banger.cli.main import main; main()'"


def ssh_options(user: str) -> list[tuple[str, str]]:
    """The OpenSSH options that reach a banger VM through `vm proxy`, with banger's key and pinned host keys."""
    return [
        ("User", user),
        ("IdentityFile", str(client_key())),
        ("ProxyCommand", f"{banger_command()} vm proxy %h 22"),
        ("UserKnownHostsFile", str(known_hosts())),
        ("StrictHostKeyChecking", "yes"),
        ("CheckHostIP", "no"),
    ]
