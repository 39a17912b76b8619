"""Regression tests of issue 9 on real guests: cp merges, vm stop keeps its timeout, limits are checked first."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BangerEnv
from tests.vms.test_vm_lifecycle import boot_vm, zombie_children

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def worker(vm_home: BangerEnv) -> Iterator[str]:
    """A VM for tests that only copy files under paths of their own; none stops or changes it."""
    boot_vm(vm_home, "worker")
    yield "worker"


def vm_names(env: BangerEnv) -> list[str]:
    return [r["name"] for r in json.loads(env.cli("vm", "ls", "--json", check=True).stdout)]


def guest_sh(env: BangerEnv, vm: str, script: str) -> str:
    return env.cli("vm", "exec", vm, "--", "sh", "-c", script, check=True, timeout=120).stdout


def test_create_refuses_more_than_the_host_has(vm_home: BangerEnv) -> None:
    before = sorted(p.name for p in (vm_home.home / "vms").iterdir()) if (vm_home.home / "vms").exists() else []
    r = vm_home.cli("vm", "create", "--name", "huge", "--net", "none", "--memory", "99999999", "--no-start")
    # Refused by the host's own size (vms/limits.py) or, first, by the configured bounds (max_*, security/access.py):
    # either way one clear line that names the limit.
    assert r.returncode != 0 and "MiB" in r.stderr, r.stderr
    assert "more than this host has" in r.stderr or "max_memory_mib" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, "a clear one-line error (a hint line at most)"
    r = vm_home.cli("vm", "create", "--name", "huge", "--net", "none", "--vcpus", "4096", "--no-start")
    assert r.returncode != 0 and ("the CPUs this host has" in r.stderr or "max_vcpus" in r.stderr), r.stderr
    r = vm_home.cli("vm", "create", "--name", "huge", "--net", "none", "--disk-size", "900T", "--no-start")
    assert r.returncode != 0 and ("free space" in r.stderr or "max_disk_gib" in r.stderr), r.stderr
    assert "huge" not in vm_names(vm_home)
    after = sorted(p.name for p in (vm_home.home / "vms").iterdir()) if (vm_home.home / "vms").exists() else []
    assert after == before, "nothing was created"


def test_cp_out_merges_into_an_existing_directory(vm_home: BangerEnv, worker: str, tmp_path: Path) -> None:
    guest_sh(vm_home, worker, "rm -rf /srv/out && mkdir -p /srv/out/d/sub && echo guest-a > /srv/out/d/a")
    guest_sh(vm_home, worker, "echo guest-b > /srv/out/d/sub/b")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a").write_text("host-a\n")
    (tmp_path / "d" / "mine").write_text("host only\n")
    (tmp_path / "d" / "sub" / "mine2").write_text("host only too\n")
    vm_home.cli("vm", "cp", f"{worker}:/srv/out/d", str(tmp_path), check=True, timeout=120)
    assert (tmp_path / "d" / "a").read_text() == "guest-a\n", "the guest's file replaced the host's"
    assert (tmp_path / "d" / "sub" / "b").read_text() == "guest-b\n"
    assert (tmp_path / "d" / "mine").read_text() == "host only\n", "what the guest lacks is kept"
    assert (tmp_path / "d" / "sub" / "mine2").read_text() == "host only too\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"], "no staging directory left behind"


def test_cp_in_merges_into_an_existing_directory(vm_home: BangerEnv, worker: str, tmp_path: Path) -> None:
    guest_sh(vm_home, worker, "rm -rf /srv/in && mkdir -p /srv/in/d && echo old > /srv/in/d/a && echo g > /srv/in/d/g")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("new\n")
    (tmp_path / "d" / "h").write_text("from host\n")
    vm_home.cli("vm", "cp", str(tmp_path / "d"), f"{worker}:/srv/in", check=True, timeout=120)
    listing = guest_sh(vm_home, worker, "cd /srv/in/d && for f in *; do echo $f=$(cat $f); done; ls -a /srv/in")
    assert listing.split() == ["a=new", "g=g", "h=from", "host", ".", "..", "d"]


def test_stop_returns_within_its_timeout_when_the_agent_hangs(vm_home: BangerEnv) -> None:
    """vm stop --timeout T answers within T + 5 s even when nothing in the guest takes the power-off request."""
    info = boot_vm(vm_home, "hang")
    pid = info["pid"]
    daemon = vm_home.daemon_pid()
    assert daemon
    # The agent runs the shell; a detached helper freezes the agent (SIGSTOP) once this exec has answered.
    parent = guest_sh(vm_home, "hang", "cat /proc/$PPID/comm")
    assert "python" in parent or "banger" in parent, f"the exec's parent is not the agent: {parent!r}"
    guest_sh(vm_home, "hang", 'setsid -f sh -c "sleep 1; kill -STOP $PPID" </dev/null >/dev/null 2>&1')
    time.sleep(3)
    began = time.monotonic()
    r = vm_home.cli("vm", "stop", "hang", "--timeout", "1", "--json", timeout=120)
    took = time.monotonic() - began
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "stopped"
    assert took < 1 + 5, f"vm stop --timeout 1 took {took:.1f}s"
    assert pid not in zombie_children(daemon), (
        f"the killed VMM stayed a zombie; daemon log:\n{vm_home.log_text()[-3000:]}"
    )
    vm_home.cli("vm", "rm", "hang", check=True)


def test_logs_follow_delivers_a_large_append_and_daemon_stop_ends_it(vm_home: BangerEnv) -> None:
    """`vm logs -f` reads the console log in bounded slices off the loop: a 3 MiB burst arrives whole, and an
    attached follower does not hold up `daemon stop`."""
    vm_home.cli("vm", "create", "--name", "quiet", "--net", "none", "--no-start", check=True, timeout=300)
    log = Path(json.loads(vm_home.cli("vm", "show", "quiet", "--json", check=True).stdout)["dir"]) / "console.log"
    follower = vm_home.popen("vm", "logs", "-f", "-n", "0", "quiet")
    try:
        time.sleep(2)
        line = b"x" * 1023 + b"\n"
        with log.open("ab") as f:
            f.write(line * 3072)
            f.write(b"END-OF-BURST\n")
        assert follower.stdout is not None
        got = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = follower.stdout.readline()
            if text.startswith("END-OF-BURST"):
                break
            got += len(text)
        assert got == 3 * 1024 * 1024, f"the follower saw {got} bytes of the burst"
        began = time.monotonic()
        vm_home.cli("daemon", "stop", check=True, timeout=60)
        assert time.monotonic() - began < 30
        follower.wait(timeout=30)
    finally:
        follower.kill()
        follower.communicate()
    vm_home.cli("vm", "rm", "quiet", check=True)
