"""`banger doctor`'s lines about VMM confinement (see drivers/confine.py for what they mean)."""

from __future__ import annotations

from typing import Any


def confinement_lines(rep: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, text) pairs: what is in force, then each thing this host lacks."""
    if not rep:
        return [("confinement", "unknown (daemon too old to say)")]
    qemu = rep["qemu"]
    if qemu["enabled"]:
        state = f"qemu as uids {qemu['uid_range']}, no_new_privs, seccomp sandbox {qemu['seccomp_sandbox']}"
    else:
        state = "qemu unconfined"
    groups = rep["cgroups"]
    lines = [("confinement", state), ("cgroups", f"{groups['version']} ({', '.join(groups['controllers']) or '-'})")]
    lines += [("missing", m) for m in rep["missing"]]
    return lines
