"""Config, paths and the VM name generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.config import Paths, Settings
from banger.errors import ConfigError, InvalidInputError
from banger.names import generate_name, is_dns_label, validate_name


def test_banger_home_relocates_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANGER_HOME", str(tmp_path / "root"))
    paths = Paths.from_env()
    for p in (paths.db, paths.socket, paths.kernels, paths.images, paths.vms, paths.daemon_log, paths.cache):
        assert p.is_relative_to(tmp_path / "root")


def test_config_file_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANGER_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('kernel_catalog = "/from/file.json"\nagent_timeout = 30\n')
    monkeypatch.delenv("BANGER_CATALOG", raising=False)
    s = Settings.load()
    assert s.kernel_catalog == "/from/file.json"
    assert s.get("agent_timeout") == 30.0
    monkeypatch.setenv("BANGER_CATALOG", "http://127.0.0.1:1/c.json")
    assert Settings.load().kernel_catalog == "http://127.0.0.1:1/c.json"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nope = 1\n", "unknown key 'nope'"),
        ("agent_timeout = 'x'\n", "must be a float"),
        ("= =\n", "invalid TOML"),
        ("vmm = 'bogus'\n", "auto, qemu or firecracker"),
        ("subnet = 'garbage'\n", "not an IPv4 network"),
        ("agent_timeout = -5\n", "above 0"),
        ("log_level = 'basic_format'\n", "debug, info"),
    ],
)
def test_bad_config_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, match: str) -> None:
    monkeypatch.setenv("BANGER_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        Settings.load()


def test_relative_catalog_path_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANGER_HOME", str(tmp_path))
    monkeypatch.delenv("BANGER_CATALOG", raising=False)
    monkeypatch.chdir("/")
    (tmp_path / "config.toml").write_text('kernel_catalog = "cats/c.json"\n')
    assert Settings.load().kernel_catalog == str(tmp_path / "cats" / "c.json")


def test_generated_names_are_unique_dns_labels() -> None:
    taken: set[str] = set()
    for _ in range(500):
        name = generate_name(taken)
        assert is_dns_label(name) and name.count("-") >= 1
        assert name not in taken
        taken.add(name)


@pytest.mark.parametrize("bad", ["", "UPPER", "-lead", "trail-", "a" * 64, "dot.ted", "under_score", "newline\n"])
def test_invalid_names_rejected(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_name(bad)


def test_plain_progress_lines_show_rate_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    from banger.cli.output import ProgressRenderer
    from banger.progress import ProgressEvent

    renderer = ProgressRenderer()
    renderer.tty = False
    renderer(ProgressEvent("downloading k", 0, 100 << 20))
    renderer._started["downloading k"] -= 2.0  # as if two seconds had passed since the first event
    renderer(ProgressEvent("downloading k", 100 << 20, 100 << 20))
    renderer._started["other"] = renderer._started["downloading k"]
    renderer(ProgressEvent("other", 25 << 20, 100 << 20))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "downloading k: 0 B / 100.0 MiB (0%)"
    assert lines[1].startswith("downloading k: 100.0 MiB / 100.0 MiB (100%), ") and "MiB/s" in lines[1]
    assert "ETA" in lines[2] and "(25%)" in lines[2]
