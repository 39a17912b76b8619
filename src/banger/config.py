"""One state root and a TOML config file; environment variables override the file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger.errors import ConfigError

# Keys accepted in config.toml, with their types; documented in README.md ("Configuration").
CONFIG_KEYS: dict[str, type] = {
    "kernel_catalog": str,
    "default_kernel": str,
    "default_image": str,
    "vmm": str,
    "firecracker_bin": str,
    "qemu_bin": str,
    "bridge": str,
    "subnet": str,
    "dns_domain": str,
    "agent_timeout": float,
    "log_level": str,
    "console_log_max_mib": int,
    "forward_ports": str,
    "session_log_max_mib": int,
    "tcg_cpu": str,
    "agent": dict,
    # Who may use the daemon, and how much each request may take (see security/access.py).
    "socket_group": str,
    "max_vcpus": int,
    "max_memory_mib": int,
    "max_disk_gib": int,
    "max_vms_per_user": int,
}

ENV_OVERRIDES: dict[str, str] = {
    "BANGER_CATALOG": "kernel_catalog",
    "BANGER_VMM": "vmm",
    "BANGER_FIRECRACKER": "firecracker_bin",
    "BANGER_QEMU": "qemu_bin",
    "BANGER_LOG_LEVEL": "log_level",
}

DEFAULTS: dict[str, Any] = {
    "kernel_catalog": None,
    "default_kernel": "debian-cloud",
    "default_image": "debian-bookworm",
    "vmm": "auto",
    "firecracker_bin": None,
    "qemu_bin": None,
    "bridge": "banger0",
    "subnet": "172.30.77.0/24",
    "dns_domain": "vm",
    "agent_timeout": 120.0,
    "log_level": "info",
    "console_log_max_mib": 10,
    "forward_ports": "auto",
    "session_log_max_mib": 64,
    "tcg_cpu": "max",
    "agent": {},
    "socket_group": None,  # None: the `banger` group when it exists, else root only; "" : root only
    "max_vcpus": 16,
    "max_memory_mib": 16384,
    "max_disk_gib": 256,
    "max_vms_per_user": 16,
}


def default_home() -> Path:
    """Where state lives without BANGER_HOME: /var/lib/banger for root, the XDG data dir otherwise."""
    from banger.cli.fast import state_home

    return Path(state_home())


@dataclass(frozen=True)
class Paths:
    """Every file banger owns hangs off one root."""

    home: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(default_home())

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "bangerd.sock"

    @property
    def lock(self) -> Path:
        return self.run_dir / "bangerd.lock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "bangerd.pid"

    @property
    def db(self) -> Path:
        return self.home / "banger.db"

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def daemon_log(self) -> Path:
        return self.logs / "bangerd.log"

    @property
    def kernels(self) -> Path:
        return self.home / "kernels"

    @property
    def images(self) -> Path:
        return self.home / "images"

    @property
    def vms(self) -> Path:
        return self.home / "vms"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    def ensure(self) -> None:
        """Create the state directories (private to the owner)."""
        for d in (self.home, self.run_dir, self.logs, self.kernels, self.images, self.vms, self.cache):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)


@dataclass(frozen=True)
class Settings:
    """Config file values merged over defaults, with environment overrides on top."""

    paths: Paths
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values[key]

    @property
    def kernel_catalog(self) -> str | None:
        value = self.values.get("kernel_catalog")
        return str(value) if value else None

    @classmethod
    def load(cls, paths: Paths | None = None) -> Settings:
        paths = paths or Paths.from_env()
        values = dict(DEFAULTS)
        values.update(read_config_file(paths.config_file))
        for env, key in ENV_OVERRIDES.items():
            if os.environ.get(env):
                values[key] = os.environ[env]
        return cls(paths=paths, values=values)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse and type-check config.toml; an unknown key or wrong type is a clear error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for key, value in data.items():
        want = CONFIG_KEYS.get(key)
        if want is None:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(CONFIG_KEYS))})")
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want):
            raise ConfigError(f"{path}: key {key!r} must be a {want.__name__}")
        problem = _check_value(key, value)
        if problem:
            raise ConfigError(f"{path}: key {key!r}: {problem}")
        out[key] = value
    catalog = out.get("kernel_catalog")
    if catalog and "://" not in catalog and not os.path.isabs(catalog):
        # Relative to the config file, not to wherever the daemon happened to be started.
        out["kernel_catalog"] = str(path.parent / catalog)
    return out


# The [agent] table: the model provider of agent VMs (the key itself stays in the environment).
AGENT_KEYS = ("base_url", "model", "api_key_env")


def _check_agent_table(table: dict[str, Any]) -> str | None:
    for k, v in table.items():
        if k not in AGENT_KEYS:
            return f"unknown key {k!r} (known: {', '.join(AGENT_KEYS)})"
        if not isinstance(v, str):
            return f"{k} must be a string"
    url = table.get("base_url")
    if url and not url.startswith(("http://", "https://")):
        return "base_url must be an http(s) URL"
    return None


def is_cpu_model(value: str) -> bool:
    """A QEMU `-cpu` value: a model name with optional ,flag=value features (no spaces, nothing shell-like)."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=,-]{0,127}", value))


def _check_value(key: str, value: Any) -> str | None:
    """Why a config value is unusable, or None: checked at load so a bad value fails at daemon start."""
    if key == "vmm" and value not in ("auto", "qemu", "firecracker"):
        return "must be auto, qemu or firecracker"
    if key == "agent_timeout" and not 0 < value < 86400:
        return "must be a number of seconds above 0"
    if key == "forward_ports" and value not in ("auto", "off"):
        return "must be auto or off"
    if key == "session_log_max_mib" and not 1 <= value <= 65536:
        return "must be a number of MiB from 1 to 65536"
    if key == "agent":
        return _check_agent_table(value)
    if key == "tcg_cpu" and not is_cpu_model(value):
        return "must be a QEMU CPU model name such as max, qemu64 or Haswell-v4"
    if key == "log_level" and value.lower() not in ("debug", "info", "warning", "error"):
        return "must be debug, info, warning or error"
    if key == "subnet":
        import ipaddress

        try:
            net = ipaddress.IPv4Network(value)
        except ValueError as exc:
            return f"not an IPv4 network: {exc}"
        if net.prefixlen > 29:
            return "needs at least a /29 (a gateway and some guests)"
    if key == "console_log_max_mib" and not 1 <= value <= 65536:
        return "must be a number of MiB from 1 to 65536"
    if key in ("max_vcpus", "max_memory_mib", "max_disk_gib", "max_vms_per_user") and (
        isinstance(value, bool) or value < 1
    ):
        return "must be a whole number of at least 1"
    if key in ("bridge", "dns_domain", "default_kernel", "default_image") and not value:
        return "must not be empty"
    return None
