"""The create form's body, read with the CLI's option names and defaults and turned into the CLI's vm.create params."""

from __future__ import annotations

from typing import Any

from banger.cli.vm_cmds import _create_params
from banger.errors import InvalidInputError

# name -> (type, default): the options of `banger vm create`, spelled with underscores.
CREATE_OPTIONS: dict[str, tuple[type, Any]] = {
    "name": (str, None),
    "image": (str, None),
    "kernel": (str, None),
    "vcpus": (int, None),  # None: the CLI's default (2, or the agent VM's)
    "memory": (int, None),
    "disk_size": (str, None),
    "vmm": (str, None),
    "timeout": (float, None),
    "net": (str, "bridge"),
    "publish": (list, []),
    "reverse": (list, []),
    "forward_ports": (str, None),
    "cpu": (str, None),
    "agent": (str, None),
    "allow_host": (list, []),
    "isolate": (bool, False),
    "egress": (str, None),
    "allow_domain": (list, []),
    "allow_cidr": (list, []),
    "no_start": (bool, False),
}


def create_params_from(body: dict[str, Any]) -> dict[str, Any]:
    """vm.create params for a create-form body; unknown or mistyped options are a clear InvalidInputError."""
    unknown = sorted(set(body) - set(CREATE_OPTIONS))
    if unknown:
        raise InvalidInputError(
            f"unknown create option(s): {', '.join(unknown)}", hint=f"known: {', '.join(CREATE_OPTIONS)}"
        )
    opts: dict[str, Any] = {}
    for key, (kind, default) in CREATE_OPTIONS.items():
        value = body.get(key)
        if value is None or value == "":
            opts[key] = default
            continue
        if kind is list and isinstance(value, str):
            value = [p for p in value.replace(",", " ").split() if p]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidInputError(f"create option {key} must be {kind.__name__}, got {type(value).__name__}")
        opts[key] = value
    opts["allow_host"] = [int(p) if isinstance(p, str) and p.isdigit() else p for p in opts["allow_host"]]
    opts["ssh_key"] = []  # key files are the CLI's (`--ssh-key`); the page authorizes the user's default keys
    return _create_params(opts, start=not opts.pop("no_start"))
