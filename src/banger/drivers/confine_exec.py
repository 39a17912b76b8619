"""Exec step of a confined VMM: join its cgroups, then exec the rest of argv (setpriv, then the VMM).

Runs as root between the daemon's fork and the VMM: `python -m banger.drivers.confine_exec CGROUP... -- ARGV`.
Writing our own pid before exec means the VMM is in its groups from its first instruction, and keeps the pid
the daemon recorded.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    """Join each cgroup directory named before `--`, then exec what follows it."""
    split = argv.index("--")
    for group in argv[:split]:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    target = argv[split + 1 :]
    os.execv(target[0], target)


if __name__ == "__main__":
    main(sys.argv[1:])
