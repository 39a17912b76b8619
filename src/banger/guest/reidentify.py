"""Run inside a restored guest (a clone of a snapshot) to take on its own identity. Stdlib only.

The daemon sends this file's text to the agent, which runs its `run()` in its own process (the agent's REIDENTIFY
request: no new interpreter to start, most of a second under TCG), with the new identity: hostname, machine-id,
network (the interface keeps its name; MAC, address and route change), entropy for the kernel pool, and the host's
wall clock; `run()` returns the report. An agent without that request (one saved in an older snapshot) runs the
file with `python3 -c` instead: the identity as JSON on stdin, the report as JSON on stdout. The text comes from
the daemon, not from the guest's seed, so a clone of an old snapshot still gets today's code. The guest memory came
from another machine, so everything that must differ between machines is set here, before the clone is reported
ready; processes that were running go on running.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from typing import Any

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _write(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.banger-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    # Created with its final mode: a private key is never readable by others, not even for a moment.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as f:
        f.write(text)
    os.chmod(tmp, mode)  # the umask may have taken bits the mode asked for
    os.replace(tmp, path)


def set_clock(seconds: float) -> None:
    """Step the wall clock to the host's: the snapshot's clock is as old as the snapshot."""
    time.clock_settime(time.CLOCK_REALTIME, seconds)


def add_entropy(data: bytes) -> None:
    """Mix fresh host randomness into the kernel pool and credit it: clones must not share random state."""
    info = struct.pack("ii", len(data) * 8, len(data)) + data
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        # Credited entropy alone waits for the next scheduled reseed; until then every clone's CRNG would still
        # produce the snapshot's stream. (microvm has no vmgenid device to make the kernel do this itself.)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def set_hostname(name: str) -> None:
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)
    _write("/etc/hostname", name + "\n")
    hosts = (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{name}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
    _write("/etc/hosts", hosts)


def set_machine_id(machine_id: str) -> None:
    _write("/etc/machine-id", machine_id + "\n", 0o444)
    if os.path.exists("/var/lib/dbus/machine-id") and not os.path.islink("/var/lib/dbus/machine-id"):
        _write("/var/lib/dbus/machine-id", machine_id + "\n", 0o444)


def network_commands(net: dict[str, Any]) -> list[list[str]]:
    """`ip` argument lists that move the interface to its new MAC and address."""
    dev = str(net["name"])
    cmds = [
        ["ip", "link", "set", "dev", dev, "down"],
        ["ip", "link", "set", "dev", dev, "address", str(net["mac"])],
        ["ip", "address", "flush", "dev", dev],
        ["ip", "address", "add", f"{net['address']}/{net['prefix']}", "dev", dev],
        ["ip", "link", "set", "dev", dev, "up"],
    ]
    if gateway := net.get("gateway"):
        cmds.append(["ip", "-4", "route", "replace", "default", "via", str(gateway), "dev", dev])
    return cmds


def set_network(net: dict[str, Any]) -> list[str]:
    problems = []
    commands = network_commands(net)
    ip = shutil.which("ip", path=PATH)
    if ip is not None and os.path.basename(os.path.realpath(ip)) != "busybox":
        # One `ip -batch` run for all of them: each process start costs a tenth of a second under TCG. A batch line
        # takes no options (the route's family comes from its gateway); -force goes on past a failed line.
        script = "".join(" ".join(a for a in argv[1:] if a not in ("-4", "-6")) + "\n" for argv in commands)
        done = subprocess.run(
            [ip, "-force", "-batch", "-"], input=script, capture_output=True, text=True, check=False,
            env={"PATH": PATH}, timeout=20,
        )  # fmt: skip
        if done.returncode != 0:
            problems.append(" ".join(done.stderr.split()))
    else:
        for argv in commands:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, env={"PATH": PATH}, timeout=20)
            if done.returncode != 0:
                problems.append(f"{' '.join(argv)}: {done.stderr.strip()}")
    if net.get("nameservers") or net.get("search"):
        lines = ["# written by banger for this clone"]
        if net.get("search"):
            lines.append("search " + " ".join(net["search"]))
        lines += [f"nameserver {ns}" for ns in net.get("nameservers", [])[:3]]
        _write("/etc/resolv.conf", "\n".join(lines) + "\n")
    return problems


KEY_TYPES = ("rsa", "ecdsa", "ed25519")


def new_ssh_host_keys(given: dict[str, dict[str, str]] | None, etc_ssh: str = "/etc/ssh") -> list[str]:
    """Fresh SSH host keys where the image has an SSH server (sshd reads them again for every connection): the ones
    the host made (`given`), or made here by `ssh-keygen -A` when the host sent none. The public keys, sorted."""
    if not os.path.isdir(etc_ssh) or not os.path.exists(f"{etc_ssh}/sshd_config"):
        return []
    keygen = shutil.which("ssh-keygen", path=PATH)
    if not given and keygen is None:
        return []
    for name in os.listdir(etc_ssh):
        if name.startswith("ssh_host_") and ("_key" in name):
            os.unlink(os.path.join(etc_ssh, name))
    if given:
        for kind in KEY_TYPES:
            if pair := given.get(kind):
                base = f"{etc_ssh}/ssh_host_{kind}_key"
                _write(base, pair["private"], 0o600)
                _write(f"{base}.pub", pair["public"].strip() + "\n", 0o644)
    else:
        assert keygen is not None
        subprocess.run([keygen, "-A"], capture_output=True, check=True, env={"PATH": PATH}, timeout=120)
    keys = []
    for name in sorted(os.listdir(etc_ssh)):
        if name.startswith("ssh_host_") and name.endswith(".pub"):
            with open(os.path.join(etc_ssh, name)) as f:
                keys.append(f.read().strip())
    return keys


def run(identity: dict[str, Any]) -> dict[str, Any]:
    """Take on `identity`; the report: hostname, problems (network commands that failed), SSH host public keys."""
    set_clock(float(identity["time"]))
    add_entropy(base64.b64decode(identity["entropy"]))
    set_hostname(str(identity["hostname"]))
    set_machine_id(str(identity["machine_id"]))
    report: dict[str, Any] = {"hostname": identity["hostname"], "problems": []}
    if identity.get("network"):
        report["problems"] += set_network(identity["network"])
    report["ssh_host_keys"] = new_ssh_host_keys(identity.get("ssh_host_keys"))
    return report


def main() -> int:
    print(json.dumps(run(json.loads(sys.stdin.read()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
