"""The tooling plan of a checkout: which toolchains its files ask for, and how banger installs them in the guest.

Detection reads marker files (pyproject.toml, requirements*.txt, package.json + .nvmrc, go.mod, Cargo.toml +
rust-toolchain*, Gemfile + .ruby-version, Makefile, .tool-versions, mise.toml). An optional `.banger.toml` is
explicit and wins: its `tools = {name = "version"}` replace what detection found for those tools, `packages = [...]`
adds Debian packages, `setup = [...]` adds shell commands run in the workspace, and `detect = false` turns
detection off. Toolchains come from Debian's archive (reachable from the host and from guests); a version Debian
cannot give is a warning that says what was asked, by which file, and what gets installed instead.

Runs in the CLI, as the user, on the user's files; it only reads them.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger.errors import InvalidInputError

SUITE = "bookworm"
CONFIG = ".banger.toml"
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_VERSION_RE = re.compile(r"(\d+)(?:\.(\d+))?")
_ANY = {"", "*", "latest", "stable", "lts", "lts/*", "system", "node"}


@dataclass(frozen=True)
class Toolchain:
    """How Debian (bookworm) provides a tool: its packages and the version they carry."""

    packages: tuple[str, ...]
    version: str


DEBIAN_TOOLS: dict[str, Toolchain] = {
    "python": Toolchain(("python3", "python3-venv", "python3-pip"), "3.11"),
    "node": Toolchain(("nodejs", "npm"), "18.19"),
    "go": Toolchain(("golang-go",), "1.19"),
    "rust": Toolchain(("rustc", "cargo"), "1.63"),
    "ruby": Toolchain(("ruby", "ruby-bundler"), "3.1"),
    "make": Toolchain(("make",), "4.3"),
}
ALIASES = {"python3": "python", "nodejs": "node", "golang": "go", "rustc": "rust", "cargo": "rust", "gmake": "make"}


@dataclass(frozen=True)
class PlanItem:
    """One thing to install or run: which tool, which version was asked for, who asked, and how."""

    tool: str
    version: str | None
    source: str
    via: str  # "debian" (packages from the archive), "shell" (a setup command) or "none" (cannot install)
    packages: tuple[str, ...] = ()
    installs: str | None = None
    warning: str | None = None
    command: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "version": self.version,
            "source": self.source,
            "via": self.via,
            "packages": list(self.packages),
            "installs": self.installs,
            "warning": self.warning,
            "command": self.command,
        }


@dataclass(frozen=True)
class ToolingPlan:
    """Everything a checkout asks for, in order: toolchains, extra packages, then setup commands."""

    root: Path
    items: tuple[PlanItem, ...] = field(default=())

    @property
    def packages(self) -> list[str]:
        """Debian packages to add to the image, sorted, once each."""
        return sorted({p for item in self.items for p in item.packages})

    @property
    def setup(self) -> list[str]:
        """Shell commands to run in the workspace, in order."""
        return [item.command for item in self.items if item.via == "shell" and item.command]

    @property
    def warnings(self) -> list[str]:
        """What cannot be installed as asked."""
        return [item.warning for item in self.items if item.warning]

    def to_json(self) -> list[dict[str, Any]]:
        return [item.to_json() for item in self.items]


def _vtuple(text: str) -> tuple[int, int] | None:
    m = _VERSION_RE.search(text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def satisfies(provided: str, wanted: str) -> bool:
    """Whether Debian's `provided` version meets the request `wanted` (a minimum, or a pinned major[.minor])."""
    spec = wanted.strip().lower().lstrip("v")
    if spec in _ANY or spec.startswith(("lts/", "stable")):
        return True
    have, want = _vtuple(provided), _vtuple(spec)
    if have is None or want is None:
        return True  # nothing comparable asked for (a channel name, say): Debian's version is as good as any
    if spec.startswith((">=", ">", "~=")) or "," in spec:
        return have >= want
    if spec.startswith("<"):
        return have < want
    m = _VERSION_RE.search(spec)
    if spec.startswith("^") or m is None or m.group(2) is None:
        return have[0] == want[0] and have >= want
    return have[:2] == want[:2]


def _item(tool: str, version: str | None, source: str, *, minimum: bool = False) -> PlanItem:
    name = ALIASES.get(tool.lower(), tool.lower())
    chain = DEBIAN_TOOLS.get(name)
    if chain is None:
        return PlanItem(
            name,
            version,
            source,
            "none",
            warning=f"{source} asks for {name}: Debian has no package banger knows for it",
        )
    asked = version.strip() if version else None
    warning = None
    if asked and not satisfies(chain.version, f">={asked}" if minimum else asked):
        warning = (
            f"{source} asks for {name} {asked}; Debian {SUITE} provides {chain.version} and other toolchain "
            f"downloads may be unreachable from the guest: installing {name} {chain.version} instead"
        )
    return PlanItem(name, asked, source, "debian", chain.packages, f"{name} {chain.version}", warning)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(_read(path))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid TOML: {exc}") from exc


def detect(root: Path) -> list[PlanItem]:
    """Toolchains the marker files in `root` ask for (first asker wins per tool)."""
    found: list[PlanItem] = []

    def add(tool: str, version: str | None, source: str, *, minimum: bool = False) -> None:
        name = ALIASES.get(tool.lower(), tool.lower())
        if all(item.tool != name for item in found):
            found.append(_item(tool, version, source, minimum=minimum))

    if (root / ".tool-versions").is_file():
        for line in _read(root / ".tool-versions").splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2:
                add(parts[0], parts[1], ".tool-versions")
    if (root / "mise.toml").is_file():
        for tool, version in (_toml(root / "mise.toml").get("tools") or {}).items():
            add(str(tool), str(version) if not isinstance(version, list) else str(version[0]), "mise.toml")
    if (root / "pyproject.toml").is_file():
        req = (_toml(root / "pyproject.toml").get("project") or {}).get("requires-python")
        add("python", str(req) if req else None, "pyproject.toml")
    reqs = sorted(p.name for p in root.glob("requirements*.txt") if p.is_file())
    if reqs:
        add("python", None, reqs[0])
    if (root / "package.json").is_file():
        if (root / ".nvmrc").is_file():
            add("node", _read(root / ".nvmrc").strip() or None, ".nvmrc")
        try:
            engines = json.loads(_read(root / "package.json")).get("engines") or {}
        except (ValueError, AttributeError):
            engines = {}
        add("node", str(engines["node"]) if isinstance(engines, dict) and "node" in engines else None, "package.json")
    if (root / "go.mod").is_file():
        m = re.search(r"^go\s+(\S+)", _read(root / "go.mod"), re.MULTILINE)
        add("go", m.group(1) if m else None, "go.mod", minimum=True)
    for name in ("rust-toolchain.toml", "rust-toolchain"):
        if (root / name).is_file():
            text = _read(root / name)
            m = re.search(r'channel\s*=\s*"([^"]+)"', text)
            add("rust", m.group(1) if m else (text.strip() or None), name)
    if (root / "Cargo.toml").is_file():
        rv = (_toml(root / "Cargo.toml").get("package") or {}).get("rust-version")
        add("rust", str(rv) if rv else None, "Cargo.toml", minimum=True)
    if (root / ".ruby-version").is_file():
        add("ruby", _read(root / ".ruby-version").strip() or None, ".ruby-version")
    if (root / "Gemfile").is_file():
        m = re.search(r"""^\s*ruby\s+['"]([^'"]+)['"]""", _read(root / "Gemfile"), re.MULTILINE)
        add("ruby", m.group(1) if m else None, "Gemfile")
    if any((root / n).is_file() for n in ("Makefile", "makefile", "GNUmakefile")):
        add("make", None, "Makefile")
    return found


def plan(root: Path) -> ToolingPlan:
    """The whole plan for the checkout at `root`: `.banger.toml` first, then detection for the rest."""
    config = _toml(root / CONFIG) if (root / CONFIG).is_file() else {}
    unknown = set(config) - {"packages", "tools", "setup", "detect"}
    if unknown:
        raise InvalidInputError(f"{root / CONFIG}: unknown keys {', '.join(sorted(unknown))}")
    tools = config.get("tools") or {}
    packages = config.get("packages") or []
    setup = config.get("setup") or []
    if not isinstance(tools, dict) or not isinstance(packages, list) or not isinstance(setup, list):
        raise InvalidInputError(f"{root / CONFIG}: tools is a table, packages and setup are lists")
    items: list[PlanItem] = [_item(str(t), str(v) if v else None, CONFIG) for t, v in tools.items()]
    if config.get("detect", True):
        explicit = {item.tool for item in items}
        items += [item for item in detect(root) if item.tool not in explicit]
    for pkg in packages:
        if not isinstance(pkg, str) or not _PACKAGE_RE.fullmatch(pkg):
            raise InvalidInputError(f"{root / CONFIG}: {pkg!r} is not a Debian package name")
        items.append(PlanItem(pkg, None, CONFIG, "debian", (pkg,), pkg))
    for cmd in setup:
        if not isinstance(cmd, str) or not cmd.strip():
            raise InvalidInputError(f"{root / CONFIG}: setup entries are non-empty strings")
        items.append(PlanItem("setup", None, CONFIG, "shell", command=cmd))
    return ToolingPlan(root, tuple(items))
