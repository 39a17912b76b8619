"""build_seed makes a real ext4 image; it is inspected with debugfs, without mounting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from banger.errors import InvalidInputError
from banger.guest.seed import (
    GUEST_DIR,
    GUEST_FILES,
    AgentTransport,
    NetInterface,
    Network,
    SeedMeta,
    build_seed,
    stage_seed,
)


def debugfs(image: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)
    return done.stdout


def test_build_seed_contents(tmp_path: Path) -> None:
    meta = SeedMeta(
        hostname="quiet-heron",
        vm_name="quiet-heron",
        agent_transport=AgentTransport.VIRTIO_SERIAL,
        network=Network((NetInterface("eth0", "02:00:0a:00:00:02", "10.0.0.2", 24, "10.0.0.1", 1500),), ("10.0.0.1",)),
    )
    out = tmp_path / "vm" / "seed.ext4"
    build_seed(out, meta)
    assert out.stat().st_size == 16 * 1024 * 1024
    assert [p.name for p in out.parent.iterdir()] == ["seed.ext4"]  # no temp files left behind
    listing = debugfs(out, "ls -l /")
    for name in (*GUEST_FILES, "meta.json"):
        assert f" {name}" in listing
    assert " 100644 " in listing
    stored = json.loads(debugfs(out, "cat /meta.json"))
    assert stored == meta.to_json()
    assert stored["agent"] == {"transport": "virtio-serial", "serial_port": "org.banger.agent", "vsock_port": 1024}
    assert stored["network"]["interfaces"][0]["gateway"] == "10.0.0.1"
    assert debugfs(out, "cat /agent.py") == (GUEST_DIR / "agent.py").read_text()
    label = subprocess.run(["e2label", str(out)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == "BANGERSEED"


def test_build_seed_replaces_atomically_and_net_none(tmp_path: Path) -> None:
    out = tmp_path / "seed.ext4"
    build_seed(out, SeedMeta(hostname="a", vm_name="a"))
    build_seed(out, SeedMeta(hostname="b", vm_name="b"))
    stored = json.loads(debugfs(out, "cat /meta.json"))
    assert stored["hostname"] == "b" and stored["network"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.ext4"]


def test_invalid_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="hostname"):
        SeedMeta(hostname="bad_name!", vm_name="x")
    with pytest.raises(InvalidInputError, match="MAC"):
        NetInterface("eth0", "nope", "10.0.0.2", 24)
    with pytest.raises(InvalidInputError, match="address"):
        NetInterface("eth0", "02:00:00:00:00:01", "10.0.0.300", 24)
    with pytest.raises(InvalidInputError, match="different IP versions"):
        NetInterface("eth0", "02:00:00:00:00:01", "10.0.0.2", 24, gateway="fd00::1")
    with pytest.raises(InvalidInputError, match="nameserver"):
        Network((), nameservers=("dns.example",))


def test_seed_ships_bytecode_the_guest_can_load(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    stage_seed(stage, SeedMeta(hostname="h", vm_name="h"))
    tag = sys.implementation.cache_tag
    for name in GUEST_FILES:
        pyc = stage / "__pycache__" / f"{Path(name).stem}.{tag}.pyc"
        assert pyc.stat().st_mode & 0o777 == 0o644
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b01  # hash-based, unchecked: the seed is read-only and built from these very sources
    # The agent starts as init starts it (init.run_agent: the seed's `agent` module imported from the seed
    # directory, in a process that already runs init), loading bytecode, not sources.
    for name in GUEST_FILES:
        (stage / name).write_text("raise SystemExit('source was compiled instead of the bytecode')\n")
    code = f"import sys; sys.path.insert(0, {str(stage)!r}); import init; init.run_agent(['--help'], {str(stage)!r})"
    done = subprocess.run([sys.executable, "-B", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "banger-agent" in done.stdout, done.stderr
    bad = subprocess.run(
        [sys.executable, "-B", "-c", code.replace("'--help'", "'--vsock', 'x'")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--vsock: invalid value 'x'" in bad.stderr, bad.stderr
