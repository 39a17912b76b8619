"""Real guests under QEMU microvm (TCG here), driven through the real CLI and daemon."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, BangerEnv
from tests.foundation.test_daemon import process_gone, wait_for

pytestmark = pytest.mark.vm


def vm_info(env: BangerEnv, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads(env.cli("vm", "show", name, "--json", check=True).stdout)  # type: ignore[no-any-return]


def boot_vm(env: BangerEnv, name: str) -> dict:  # type: ignore[type-arg]
    """Create and start a VM of the test's own; --net none: these tests run in the host's own namespace."""
    r = env.cli(
        "vm", "create", "--name", name, "--net", "none", "--vcpus", "1", "--memory", "512", "--json", timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "running"
    return vm_info(env, name)


def zombie_children(pid: int) -> list[int]:
    """Children of `pid` that exited and were never reaped."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    zombies = []
    for kid in kids:
        try:
            stat = Path(f"/proc/{kid}/stat").read_text()
        except FileNotFoundError:
            continue
        if stat[stat.rindex(")") + 2 :].split()[0] == "Z":
            zombies.append(kid)
    return zombies


@pytest.fixture(scope="module")
def running_vm(vm_home: BangerEnv) -> str:
    """A VM shared by tests that only run commands in it; no test may stop, kill or remove it."""
    boot_vm(vm_home, "alpha")
    return "alpha"


def test_exec_streams_and_exit_code(vm_home: BangerEnv, running_vm: str) -> None:
    r = vm_home.cli("vm", "exec", running_vm, "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    assert r.returncode == 3
    assert r.stdout == "to-out\n"
    assert r.stderr == "to-err\n"
    r = vm_home.cli(
        "vm",
        "exec",
        running_vm,
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo "$GREETING from $(pwd) as $(id -un)"',
        check=True,
    )
    assert r.stdout == "hi there from /tmp as root\n"


def test_plain_exec_and_show_take_the_fast_path_with_the_same_results(vm_home: BangerEnv, running_vm: str) -> None:
    """`vm exec NAME -- CMD` and `vm show NAME [--json]` skip click (issue 14, item 6) and behave as the full CLI:
    same output, exit codes, JSON and errors."""
    from tests.conftest import VENV_BIN

    def traced(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
        argv = [str(VENV_BIN / "python"), "-X", "importtime", "-m", "banger.cli.main", *args]
        proc = subprocess.run([*vm_home.wrap, *argv], env=vm_home.env, capture_output=True, text=True, timeout=120)
        modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        return proc, modules

    fast, modules = traced("vm", "exec", running_vm, "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
    assert not modules & {"click", "typing", "dataclasses", "pathlib"}, "the plain exec imported a heavy module"
    assert fast.returncode == 3 and fast.stdout == "to-out\n" and "to-err\n" in fast.stderr
    shown, modules = traced("vm", "show", running_vm, "--json")
    assert "click" not in modules and shown.returncode == 0
    full = vm_home.cli("vm", "show", "--json", running_vm, check=True)  # option first: the full CLI
    assert json.loads(shown.stdout) == json.loads(full.stdout)
    plain, modules = traced("vm", "show", running_vm)
    assert "click" not in modules and plain.returncode == 0
    full_plain = vm_home.cli("--debug", "vm", "show", running_vm, check=True)  # an option first: the full CLI
    assert plain.stdout == full_plain.stdout and plain.stdout.startswith("name:")
    assert [line.split(":")[0] for line in plain.stdout.splitlines()][:3] == ["name", "id", "state"]
    missing = vm_home.cli("vm", "exec", "no-such-vm", "--", "true")
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "no-such-vm" in missing.stderr


def test_exec_stdin(vm_home: BangerEnv, running_vm: str) -> None:
    payload = "".join(f"line {i}\n" for i in range(2000))
    script = "cat > /tmp/in; wc -l < /tmp/in; md5sum /tmp/in"
    r = vm_home.cli("vm", "exec", "-i", running_vm, "--", "sh", "-c", script, input=payload, check=True)
    lines, digest = r.stdout.split("\n")[:2]
    import hashlib

    assert lines.strip() == "2000"
    assert digest.split()[0] == hashlib.md5(payload.encode()).hexdigest()


def test_exec_stdin_larger_than_the_daemon_holds_waits_for_the_guest(vm_home: BangerEnv, running_vm: str) -> None:
    # 80 MiB is over 100 MiB as base64 on the wire, past the 64 MiB of unread input a call may hold: the CLI must
    # keep a window in flight (acks from the daemon) rather than send it all and have the call cancelled.
    import hashlib

    payload = os.urandom(40 * 2**20).hex()
    r = vm_home.cli("vm", "exec", "-i", running_vm, "--", "sha256sum", input=payload, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(payload.encode()).hexdigest()


def test_exec_without_i_gives_the_command_no_input(vm_home: BangerEnv, running_vm: str) -> None:
    r = vm_home.cli("vm", "exec", running_vm, "--", "cat", input="ignored\n", timeout=60)
    assert r.returncode == 0 and r.stdout == ""  # cat saw end of input at once instead of waiting for it


def test_exec_ctrl_c_is_forwarded(vm_home: BangerEnv, running_vm: str) -> None:
    proc = vm_home.popen(
        "vm",
        "exec",
        running_vm,
        "--",
        "sh",
        "-c",
        "trap 'echo got-int; exit 42' INT; echo ready; while :; do sleep 0.1; done",
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=60)
    assert "got-int" in out
    assert proc.returncode == 42


def test_ls_and_show_json(vm_home: BangerEnv, running_vm: str) -> None:
    rows = json.loads(vm_home.cli("vm", "ls", "--json", check=True).stdout)
    assert [r["name"] for r in rows] == [running_vm]
    assert json.loads(vm_home.cli("vm", "list", "--json", check=True).stdout) == rows
    info = vm_info(vm_home, running_vm)
    assert info["state"] == "running" and info["vmm"] == "qemu" and info["pid"]
    assert "alpha" in vm_home.cli("vm", "ls", check=True).stdout


def test_cp_round_trip(vm_home: BangerEnv, running_vm: str, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    vm_home.cli("vm", "cp", str(src), f"{running_vm}:/root/tree", check=True)
    r = vm_home.cli(
        "vm", "exec", running_vm, "--", "sh", "-c", "stat -c %a /root/tree/run.sh; /root/tree/run.sh", check=True
    )
    assert r.stdout == "750\nhi\n"
    back = tmp_path / "back"
    vm_home.cli("vm", "cp", f"{running_vm}:/root/tree", str(back), check=True)
    assert (back / "sub" / "data.bin").read_bytes() == (src / "sub" / "data.bin").read_bytes()
    assert (back / "run.sh").stat().st_mode & 0o777 == 0o750


def test_ports_lists_a_listener(vm_home: BangerEnv, running_vm: str) -> None:
    vm_home.cli(
        "vm",
        "exec",
        running_vm,
        "--",
        "sh",
        "-c",
        "setsid python3 -m http.server 8765 >/dev/null 2>&1 < /dev/null & sleep 0.1",
        check=True,
    )

    def listening() -> list:  # type: ignore[type-arg]
        rows = json.loads(vm_home.cli("vm", "ports", running_vm, "--json", check=True).stdout)
        return [p for p in rows if p["port"] == 8765 and p["proto"].startswith("tcp")]

    found = wait_for(listening, timeout=60, what="guest port 8765 to listen")
    assert found[0]["pid"] and "python3" in (found[0].get("comm") or "")


def test_shell_on_a_pty(vm_home: BangerEnv, running_vm: str) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # child: become the CLI on the pseudo-terminal
        os.environ.update(vm_home.env)
        os.execv(str(VENV_BIN / "banger"), ["banger", "vm", "shell", running_vm])
    buf = b""
    try:
        deadline = time.monotonic() + 60
        while b"# " not in buf:  # the guest shell's prompt: it is reading the terminal now
            assert time.monotonic() < deadline, f"no prompt; got {buf!r}"
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                buf += os.read(fd, 4096)
        # A window resize on our terminal reaches the guest's PTY.
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        time.sleep(0.5)  # SIGWINCH is delivered asynchronously to the CLI, which forwards it
        os.write(fd, b"echo sum-$((20+22)); tty; stty size\n")
        while b"sum-42" not in buf or b"/dev/pts/" not in buf or b"50 132" not in buf:
            assert time.monotonic() < deadline, f"no shell output; got {buf!r}"
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                buf += os.read(fd, 4096)
        os.write(fd, b"exit 7\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        os.close(fd)


def _read_until(fd: int, marker: bytes, buf: bytes, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while marker not in buf:
        assert time.monotonic() < deadline, f"waiting for {marker!r}; got {buf[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            buf += os.read(fd, 4096)
    return buf


def test_console_is_interactive_and_detaches(vm_home: BangerEnv, running_vm: str) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(vm_home.env)
        os.execv(str(VENV_BIN / "banger"), ["banger", "vm", "console", running_vm])
    try:
        buf = _read_until(fd, b"Ctrl-] detaches", b"")
        os.write(fd, b"\r")  # the console shell prints a fresh prompt
        buf = _read_until(fd, b"# ", buf)
        os.write(fd, b"echo con-$((6*7)) on $(tty)\r")
        buf = _read_until(fd, b"con-42 on /dev/ttyS0", buf)
        os.write(fd, b"\x1d")  # Ctrl-]
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
    # The console's output was also logged.
    assert "con-42" in vm_home.cli("vm", "logs", running_vm, check=True).stdout


def test_kernel_and_image_in_use_cannot_be_removed(vm_home: BangerEnv, running_vm: str) -> None:
    r = vm_home.cli("kernel", "rm", "debian-cloud")
    assert r.returncode == 1 and "used by" in r.stderr and running_vm in r.stderr
    r = vm_home.cli("image", "rm", "debian-bookworm")
    assert r.returncode == 1 and "used by" in r.stderr
    image = json.loads(vm_home.cli("image", "show", "debian-bookworm", "--json", check=True).stdout)
    assert running_vm in image["used_by"] and Path(image["path"]).is_file()


def test_image_import_list_show_rm(vm_home: BangerEnv, debian_rootfs_tar: Path) -> None:
    r = vm_home.cli("image", "import", "imported", str(debian_rootfs_tar), "--json", check=True, timeout=600)
    info = json.loads(r.stdout)
    assert info["source"] == f"import:{debian_rootfs_tar}"
    names = [i["name"] for i in json.loads(vm_home.cli("image", "list", "--json", check=True).stdout)]
    assert {"debian-bookworm", "imported"} <= set(names)
    # banger's guest side was added: the init stub is in the image (read without mounting it).
    stub = subprocess.run(
        ["debugfs", "-R", "cat /sbin/banger-init", info["path"]], capture_output=True, text=True, check=True
    ).stdout
    assert "BANGERSEED" in stub or "seed" in stub
    vm_home.cli("image", "rm", "imported", check=True)
    assert not Path(info["path"]).exists()
    assert vm_home.cli("image", "show", "imported").returncode == 1


def test_vm_run_rm(vm_home: BangerEnv) -> None:
    r = vm_home.cli(
        "vm",
        "run",
        "--rm",
        "--no-workspace",
        "--net",
        "none",
        "--name",
        "oneshot",
        "--",
        "sh",
        "-c",
        "echo ran; exit 5",
        timeout=600,
    )
    assert r.returncode == 5 and r.stdout == "ran\n"
    assert "removed oneshot" in r.stderr
    assert "oneshot" not in vm_home.cli("vm", "ls", check=True).stdout


def test_vm_run_rm_cleans_up_a_failed_start(vm_home: BangerEnv) -> None:
    r = vm_home.cli(
        "vm", "run", "--rm", "--no-workspace", "--net", "none", "--name", "doomed", "--timeout", "0.5", "--", "true"
    )
    assert r.returncode == 1 and "failed to start" in r.stderr
    rows = json.loads(vm_home.cli("vm", "ls", "--json", check=True).stdout)
    assert "doomed" not in [r["name"] for r in rows]
    assert sorted(p.name for p in (vm_home.home / "vms").iterdir()) == sorted(r["id"] for r in rows)  # no files left


def _program(pid: int) -> str:
    """The program name of a process (its argv[0]'s base name), or "" once it is gone."""
    try:
        return Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")).name
    except OSError:
        return ""


def test_daemon_killed_during_start_does_not_orphan_the_vmm(vm_home: BangerEnv) -> None:
    vm_home.cli("vm", "create", "--name", "gamma", "--net", "none", "--no-start", check=True, timeout=300)
    vm_id = vm_info(vm_home, "gamma")["id"]
    starter = vm_home.popen("vm", "start", "gamma")

    def qemu_pid() -> int | None:
        # The VM's console writer names the VM's directory too: only a process whose program is QEMU counts.
        out = subprocess.run(["pgrep", "-f", f"{vm_home.home}/vms/{vm_id}/"], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split() if "qemu" in _program(int(p))]
        return pids[0] if pids else None

    pid = wait_for(qemu_pid, timeout=60, what="gamma's QEMU to be spawned")
    daemon = vm_home.daemon_pid()
    assert daemon
    os.kill(daemon, signal.SIGKILL)  # mid-start: QEMU runs, the agent has not answered yet
    starter.communicate(timeout=60)
    wait_for(lambda: vm_home.daemon_pid() is None, what="daemon gone")
    vm_home.cli("daemon", "start", check=True)
    info = vm_info(vm_home, "gamma")
    if info["pid"] is not None:  # the daemon had recorded the VMM: it is re-adopted, not forgotten
        assert info["pid"] == pid and info["state"] == "running"

        # The guest was still booting when the daemon died: on a loaded host its agent may take a while yet.
        def exec_adopted() -> str | None:
            r = vm_home.cli("vm", "exec", "gamma", "--", "echo", "adopted", timeout=120)
            return r.stdout if r.returncode == 0 else None

        assert wait_for(exec_adopted, timeout=300, what="the adopted VM's agent") == "adopted\n"
    else:  # the VMM died with the start, or was killed between spawn and record and stopped by the restart
        assert info["state"] == "error" and "was starting" in info["reason"], info["reason"]
        assert process_gone(pid)
    vm_home.cli("vm", "rm", "-f", "gamma", check=True)
    assert process_gone(pid)


def test_restart_stops_a_vmm_the_daemon_never_recorded(vm_home: BangerEnv) -> None:
    """The window between spawning a VMM and saving its pid, made deterministic: a process spawned the way banger
    spawns VMMs (standing in for QEMU) and a record left in 'starting' with no pid. A bystander that merely names
    the VM's root disk on its command line (an admin's `tail -f`) must survive."""
    import sqlite3
    import sys

    from banger.drivers import process

    vm_home.cli("vm", "create", "--name", "delta", "--net", "none", "--no-start", check=True, timeout=300)
    info = vm_info(vm_home, "delta")
    run_dir = vm_home.home / "run" / info["id"]
    stand_in = process.spawn([sys.executable, "-c", "import time; time.sleep(600)"], log_file=run_dir / "vmm.log")
    bystander = subprocess.Popen(["tail", "-f", str(Path(info["dir"]) / "root.ext4")], stdout=subprocess.DEVNULL)
    try:
        vm_home.cli("daemon", "stop", check=True)
        db = sqlite3.connect(vm_home.home / "banger.db")
        db.execute("UPDATE vms SET state='starting', runtime=NULL WHERE name='delta'")
        db.commit()
        db.close()
        vm_home.cli("daemon", "start", check=True)
        after = vm_info(vm_home, "delta")
        assert after["state"] == "error" and "was starting" in after["reason"]
        assert wait_for(lambda: process_gone(stand_in), timeout=30, what="the unrecorded VMM killed")
        assert bystander.poll() is None, "a process that only names the root disk was killed"
    finally:
        bystander.kill()
        bystander.wait()
        if not process_gone(stand_in):
            os.kill(stand_in, signal.SIGKILL)
        os.waitpid(stand_in, 0)
    vm_home.cli("vm", "rm", "delta", check=True)


def test_daemon_sigkill_keeps_vm(vm_home: BangerEnv, running_vm: str) -> None:
    before = vm_info(vm_home, running_vm)
    pid = vm_home.daemon_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: vm_home.daemon_pid() is None, what="daemon lock release")
    vm_home.cli("daemon", "start", check=True)
    after = vm_info(vm_home, running_vm)
    assert after["state"] == "running" and after["pid"] == before["pid"]
    r = vm_home.cli("vm", "exec", running_vm, "--", "echo", "still-here", check=True)
    assert r.stdout == "still-here\n"


def test_stop_start_and_vmm_killed_behind_our_back(vm_home: BangerEnv) -> None:
    boot_vm(vm_home, "stopper")
    daemon = vm_home.daemon_pid()
    assert daemon
    info = vm_home.cli("vm", "stop", "stopper", "--json", "--timeout", "60", check=True, timeout=120)
    assert json.loads(info.stdout)["state"] == "stopped"
    vm_home.cli("vm", "start", "stopper", "--timeout", "300", check=True, timeout=600)
    pid = vm_info(vm_home, "stopper")["pid"]
    os.kill(pid, signal.SIGKILL)
    state = wait_for(
        lambda: vm_info(vm_home, "stopper")["state"] == "error" and vm_info(vm_home, "stopper"),
        timeout=30,
        what="VM marked error after its VMM was killed",
    )
    assert "exited unexpectedly" in state["reason"]
    assert pid not in zombie_children(daemon), "a VMM killed behind our back is reaped"
    vm_home.cli("vm", "rm", "stopper", check=True)


def test_rm_leaves_nothing(vm_home: BangerEnv) -> None:
    info = boot_vm(vm_home, "remover")
    vm_dir = Path(info["dir"])
    pid = vm_info(vm_home, "remover")["pid"]
    daemon = vm_home.daemon_pid()
    assert daemon
    r = vm_home.cli("vm", "rm", "remover")
    assert r.returncode == 1 and "rm -f" in r.stderr
    vm_home.cli("vm", "rm", "-f", "remover", check=True)
    assert not vm_dir.exists()
    assert not (vm_home.home / "run" / info["id"]).exists()
    assert process_gone(pid)
    # rm -f kills the VMM: the daemon, its parent, must have reaped it (no zombie for the daemon's lifetime).
    assert pid not in zombie_children(daemon)
    assert "remover" not in [r["name"] for r in json.loads(vm_home.cli("vm", "ls", "--json", check=True).stdout)]


def test_broken_rootfs_gives_console_tail(vm_home: BangerEnv) -> None:
    vm_home.cli("vm", "create", "--name", "broken", "--net", "none", "--no-start", check=True, timeout=300)
    info = vm_info(vm_home, "broken")
    root = Path(info["dir"]) / "root.ext4"
    with root.open("r+b") as f:  # wipe the superblock: the initramfs cannot mount it
        f.write(b"\0" * (1 << 20))
    r = vm_home.cli("vm", "start", "broken", timeout=600)
    assert r.returncode == 1
    assert "failed to start" in r.stderr
    assert "banger-initramfs" in r.stderr  # the console tail is part of the error
    assert vm_info(vm_home, "broken")["state"] == "error"
    vm_home.cli("vm", "rm", "broken", check=True)


def test_firecracker_refused_before_anything_is_created(vm_home: BangerEnv) -> None:
    doctor = json.loads(vm_home.cli("doctor", "--json", check=True).stdout)
    if doctor["kvm_usable"]:
        pytest.skip("this host has usable hardware KVM; the refusal under test cannot happen")
    r = vm_home.cli("vm", "create", "--name", "fc", "--net", "none", "--vmm", "firecracker")
    assert r.returncode == 1 and "KVM" in r.stderr
    assert "fc" not in vm_home.cli("vm", "ls", check=True).stdout
