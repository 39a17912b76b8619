"""Supply chain: every Python dependency is pinned with a hash, the VMM binaries with their sha256."""

from __future__ import annotations

import hashlib
import re
import subprocess

from tests.conftest import REPO, VENV_BIN


def _pins() -> dict[str, str]:
    text = (REPO / "scripts" / "setup.sh").read_text()
    return dict(re.findall(r"^(FC_WHEEL_SHA256|FIRECRACKER_SHA256|JAILER_SHA256)=([0-9a-f]{64})$", text, re.M))


def test_requirements_lock_pins_every_package_with_a_hash() -> None:
    text = (REPO / "requirements.lock").read_text()
    entries = [e for e in re.split(r"\n(?=\S)", text) if e.strip() and not e.startswith("#")]
    assert len(entries) > 10
    for entry in entries:
        assert re.match(r"^[A-Za-z0-9_.\-]+==\S+ \\\n\s+--hash=sha256:[0-9a-f]{64}", entry), entry
    setup = (REPO / "scripts" / "setup.sh").read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line and "requirements.lock" in line]
    assert installs and all("--require-hashes" in line for line in installs)


def test_vmm_binaries_match_their_pinned_sha256() -> None:
    pins = _pins()
    assert set(pins) == {"FC_WHEEL_SHA256", "FIRECRACKER_SHA256", "JAILER_SHA256"}
    for name, key in (("firecracker", "FIRECRACKER_SHA256"), ("jailer", "JAILER_SHA256")):
        binary = VENV_BIN / name
        assert binary.exists(), f"{binary} missing: run scripts/setup.sh --dev"
        assert hashlib.sha256(binary.read_bytes()).hexdigest() == pins[key], name
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20).stdout
        assert "v1.12.1" in out, out


def test_setup_refuses_a_binary_whose_digest_differs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # check_sha256 from setup.sh itself, on a file that is not the pinned one.
    bogus = tmp_path / "firecracker"
    bogus.write_bytes(b"not firecracker")
    script = (REPO / "scripts" / "setup.sh").read_text()
    func = script[script.index("check_sha256() {") : script.index("\n}\n", script.index("check_sha256() {")) + 3]
    proc = subprocess.run(
        ["bash", "-c", f'{func}\ncheck_sha256 "$1" "$2"; echo passed', "x", str(bogus), _pins()["FIRECRACKER_SHA256"]],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 1 and "passed" not in proc.stdout and "refusing" in proc.stderr
