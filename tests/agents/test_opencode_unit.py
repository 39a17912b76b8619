"""opencode's binary handling (integrity, extraction, cache), the TCG CPU model option, and agent config."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from banger.agents import opencode
from banger.config import Paths, Settings, is_cpu_model, read_config_file
from banger.drivers.base import VmSpec
from banger.drivers.qemu import QemuDriver
from banger.errors import BangerError, ConfigError, IntegrityError
from tests.conftest import BangerEnv


def _package(tmp_path: Path, member: str, data: bytes) -> Path:
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    return tgz


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_integrity_is_checked_against_the_pin(tmp_path: Path) -> None:
    tgz = _package(tmp_path, opencode.MEMBER, b"\x7fELF" + b"x" * 100)
    opencode._check_integrity(tgz, _integrity(tgz))
    other = _package(tmp_path / "..", opencode.MEMBER, b"\x7fELF" + b"y" * 100)
    with pytest.raises(IntegrityError, match="integrity mismatch"):
        opencode._check_integrity(tgz, _integrity(other))


def test_only_an_elf_binary_is_taken(tmp_path: Path) -> None:
    good = _package(tmp_path, opencode.MEMBER, b"\x7fELF" + b"z" * 1000)
    sha = opencode._extract_binary(good, tmp_path / "out")
    assert sha == hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    script = _package(tmp_path, opencode.MEMBER, b"#!/bin/sh\nrm -rf /\n")
    with pytest.raises(BangerError, match="not an ELF"):
        opencode._extract_binary(script, tmp_path / "out2")
    missing = _package(tmp_path, "package/README.md", b"hi")
    with pytest.raises(BangerError, match="has no package/bin/opencode"):
        opencode._extract_binary(missing, tmp_path / "out3")


def test_cached_binary_is_used_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = opencode.cache_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "opencode").write_bytes(b"\x7fELF")
    (target / "sha256").write_text("abc\n")
    monkeypatch.setenv("PATH", "/nonexistent")  # no npm: it must not be needed
    found = opencode.ensure_binary(tmp_path)
    assert (found.path, found.sha256, found.version) == (target / "opencode", "abc", opencode.VERSION)
    assert opencode.opencode_files(found) == [(target / "opencode", "/usr/local/bin/opencode", 0o755)]


def test_tcg_cpu_model_reaches_qemu(tmp_path: Path) -> None:
    spec = VmSpec(
        name="a", vcpus=1, memory_mib=256, kernel=tmp_path / "k", cmdline="", console_log=tmp_path / "c",
        run_dir=tmp_path, cpu_model="Haswell-v4",
    )  # fmt: skip
    assert "-cpu Haswell-v4" in " ".join(QemuDriver("qemu-system-x86_64", "tcg").argv(spec, 5, None))
    joined = " ".join(QemuDriver("qemu-system-x86_64", "kvm").argv(spec, 5, None))
    assert "-cpu host" in joined and "Haswell" not in joined  # KVM always passes the host CPU through


@pytest.mark.parametrize("value", ["max", "qemu64", "Haswell-v4", "max,+avx2", "EPYC-Rome"])
def test_cpu_model_names(value: str) -> None:
    assert is_cpu_model(value)


@pytest.mark.parametrize("value", ["", "max -smp 8", "a;b", "-cpu", "x" * 200])
def test_bad_cpu_model_names(value: str) -> None:
    assert not is_cpu_model(value)


def test_config_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('tcg_cpu = "qemu64"\nsession_log_max_mib = 8\n')
    assert read_config_file(cfg) == {"tcg_cpu": "qemu64", "session_log_max_mib": 8}
    assert (
        Settings.load(Paths(tmp_path / "home")).get("tcg_cpu") == "max"
    )  # the default: what opencode and x86-64-v2 binaries need
    cfg.write_text('tcg_cpu = "max -smp 9"\n')
    with pytest.raises(ConfigError, match="tcg_cpu"):
        read_config_file(cfg)
    cfg.write_text("session_log_max_mib = 0\n")
    with pytest.raises(ConfigError, match="session_log_max_mib"):
        read_config_file(cfg)


def test_bad_cpu_option_is_refused_before_anything_is_made(daemon: BangerEnv) -> None:
    r = daemon.cli("vm", "create", "--name", "x", "--net", "none", "--cpu", "max -smp 8", "--no-start")
    assert r.returncode == 1 and "bad --cpu" in r.stderr
    assert daemon.cli("vm", "ls", "--json", check=True).stdout.strip() == "[]"
