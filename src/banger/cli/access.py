"""What the CLI tells a user the system daemon's socket turns away, and who may start or stop that daemon."""

from __future__ import annotations

import grp
import os
import pwd


def denied_message(home: str) -> tuple[str, str]:
    """(message, hint) for a user the socket's permissions refuse: name the group that lets them in."""
    user = _me()
    group = "banger"
    for probe in (os.path.join(home, "run", "bangerd.sock"), os.path.join(home, "run")):
        try:
            gid = os.stat(probe).st_gid
        except OSError:
            continue
        if gid != 0:
            group = grp.getgrgid(gid).gr_name
        break
    return (
        f"permission denied: {user} may not use the banger daemon at {home}",
        f"ask an administrator to add you to its group: `usermod -aG {group} {user}` (then log in again)",
    )


def owns_daemon(home: str) -> bool:
    """Whether this user may start, stop or restart the daemon of `home`: root, or the owner of a personal root."""
    from banger.cli.fast import system_home

    return os.geteuid() == 0 or os.path.abspath(home) != system_home()


def _me() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
