"""The tooling plan: marker files of each kind, `.banger.toml` winning over detection, versions Debian lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banger.errors import InvalidInputError
from banger.workspace.tooling import plan, satisfies
from tests.conftest import BangerEnv


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "tool", "version", "source", "packages", "warns"),
    [
        (
            {"pyproject.toml": '[project]\nname="x"\nrequires-python=">=3.9"\n'},
            "python",
            ">=3.9",
            "pyproject.toml",
            {"python3", "python3-venv"},
            False,
        ),
        (
            {"pyproject.toml": '[project]\nrequires-python=">=3.12"\n'},
            "python",
            ">=3.12",
            "pyproject.toml",
            {"python3"},
            True,
        ),
        ({"requirements-dev.txt": "pytest\n"}, "python", None, "requirements-dev.txt", {"python3-pip"}, False),
        ({"package.json": '{"engines": {"node": ">=16"}}'}, "node", ">=16", "package.json", {"nodejs", "npm"}, False),
        ({"package.json": "{}", ".nvmrc": "20\n"}, "node", "20", ".nvmrc", {"nodejs"}, True),
        ({"go.mod": "module x\n\ngo 1.22\n"}, "go", "1.22", "go.mod", {"golang-go"}, True),
        ({"go.mod": "module x\n\ngo 1.18\n"}, "go", "1.18", "go.mod", {"golang-go"}, False),
        (
            {"Cargo.toml": '[package]\nname="x"\n', "rust-toolchain": "stable\n"},
            "rust",
            "stable",
            "rust-toolchain",
            {"rustc", "cargo"},
            False,
        ),
        ({"Gemfile": "source 'x'\nruby '3.3.0'\n"}, "ruby", "3.3.0", "Gemfile", {"ruby"}, True),
        ({"Makefile": "all:\n\ttrue\n"}, "make", None, "Makefile", {"make"}, False),
        ({".tool-versions": "nodejs 18.19.0\n"}, "node", "18.19.0", ".tool-versions", {"nodejs"}, False),
        ({"mise.toml": '[tools]\npython = "3.11"\n'}, "python", "3.11", "mise.toml", {"python3"}, False),
    ],
)
def test_detection(
    tmp_path: Path,
    files: dict[str, str],
    tool: str,
    version: str | None,
    source: str,
    packages: set[str],
    warns: bool,
) -> None:
    p = plan(_write(tmp_path, files))
    (item,) = [i for i in p.items if i.tool == tool]
    assert (item.version, item.source, item.via) == (version, source, "debian")
    assert packages <= set(p.packages)
    assert bool(item.warning) == warns
    if warns:
        assert source in item.warning and "instead" in item.warning  # type: ignore[operator]


def test_banger_toml_wins_and_adds_packages_and_setup(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "go.mod": "module x\n\ngo 1.22\n",
            "Makefile": "all:\n",
            ".banger.toml": 'packages = ["libpq-dev"]\ntools = {go = "1.19"}\nsetup = ["make deps", "echo ok"]\n',
        },
    )
    p = plan(tmp_path)
    go = next(i for i in p.items if i.tool == "go")
    assert (go.source, go.version, go.warning) == (".banger.toml", "1.19", None)
    assert "libpq-dev" in p.packages and "make" in p.packages
    assert p.setup == ["make deps", "echo ok"]
    (tmp_path / ".banger.toml").write_text("detect = false\n")
    assert plan(tmp_path).items == ()


def test_bad_banger_toml_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / ".banger.toml").write_text('packages = ["bad name; rm -rf /"]\n')
    with pytest.raises(InvalidInputError, match="not a Debian package name"):
        plan(tmp_path)
    (tmp_path / ".banger.toml").write_text("toolz = {}\n")
    with pytest.raises(InvalidInputError, match="unknown keys toolz"):
        plan(tmp_path)


def test_satisfies() -> None:
    assert satisfies("3.11", ">=3.9") and not satisfies("3.11", ">=3.12")
    assert satisfies("18.19", "18") and not satisfies("18.19", "20") and satisfies("18.19", "lts/*")
    assert satisfies("1.63", "stable") and not satisfies("1.63", "1.75")


def test_cli_plan_json(banger_env: BangerEnv, tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    _write(repo, {"go.mod": "go 1.22\n"})
    r = banger_env.cli("vm", "tooling", "plan", str(repo), "--json", check=True)
    rows = json.loads(r.stdout)
    assert rows[0]["tool"] == "go" and rows[0]["via"] == "debian" and rows[0]["source"] == "go.mod"
    assert {"tool", "version", "source", "via"} <= set(rows[0])
    r = banger_env.cli("vm", "tooling", "plan", str(repo), check=True)
    assert "go.mod" in r.stdout and "go 1.19" in r.stdout
    assert "warning:" in r.stderr and "1.22" in r.stderr
