"""End to end: the real opencode in a real guest holding a workspace, its model a STAND-IN (standin_model.py: the
model is the one component that cannot run here) on the host's loopback, reached through banger's credential proxy.

Inside a network namespace the test creates (the daemon, its bridge and the stand-in all live there; the root
namespace is never touched). The guest reaches the proxy through a reverse tunnel over the agent channel
(guest 127.0.0.1:4097; see AgentVmService.guest_base_url).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, BangerEnv
from tests.vms.conftest import installed_home
from tests.workspace.repos import git, make_repo

pytestmark = [pytest.mark.vm, pytest.mark.net, pytest.mark.timeout(3600)]

KEY = "sk-standin-" + secrets.token_hex(8)
PORT = 18555
OPENCODE_CACHE = Path("/var/cache/banger-tests/opencode-cache/agents")
# Runs in the guest: every file under the given roots and every process's environment and command line.
LEAK_SCAN = """
import glob, os, sys
key = sys.stdin.read().encode()
paths = [os.path.join(d, f) for r in ("/var/lib/banger", "/root", "/run/banger", "/tmp") for d, _, fs in os.walk(r)
         for f in fs]
me = str(os.getpid())
paths += [p for p in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline") if p.split("/")[2] != me]
for p in paths:
    try:
        with open(p, "rb") as f:
            if key in f.read(64 << 20):
                print("leak:", p)
    except OSError:
        pass
print("scanned")
"""


def check_ctrl_c_aborts_the_turn(benv: BangerEnv, session: str, record: Path) -> None:
    """Ctrl-C on a CLI waiting for a turn aborts the turn: the stand-in holds this prompt's answer back, the CLI
    gets SIGINT once the request reached it, says so and exits 130, and the agent takes the next prompt."""
    import signal
    import time

    from tests.agents.standin_model import SLOW_MARK

    asked = len(json.loads(record.read_text()))
    waiting = benv.popen("session", "send", "coder", session, f"{SLOW_MARK} take your time", "--wait")
    deadline = time.monotonic() + 900
    while SLOW_MARK not in json.dumps(json.loads(record.read_text())[asked:]):
        assert time.monotonic() < deadline and waiting.poll() is None, "the slow prompt never reached the model"
        time.sleep(1)
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 130 and "aborted" in err, out + err
    again = benv.cli("session", "send", "coder", session, "Create hello.txt after the abort", "--wait", timeout=1800)
    assert again.returncode == 0 and "[idle]" in again.stdout, again.stdout + again.stderr


def check_logs_follow_json(benv: BangerEnv, session: str, record: Path) -> None:
    """`session logs -f --json` follows a turn in flight: the saved transcript, then the turn's events as they
    become final, ending once the agent is idle; exactly the events the daemon then keeps (none twice, none lost).
    The stand-in holds this prompt's answer back for a while, so the follower is surely attached mid-turn."""
    import time

    from tests.agents.standin_model import PAUSE_MARK

    asked = len(json.loads(record.read_text()))
    before = benv.cli("session", "logs", "coder", session, "--json", check=True).stdout
    benv.cli("session", "send", "coder", session, f"{PAUSE_MARK} Create hello.txt while followed", check=True)
    follower = benv.popen("session", "logs", "coder", session, "-f", "--json")
    deadline = time.monotonic() + 900
    while PAUSE_MARK not in json.dumps(json.loads(record.read_text())[asked:]):
        assert time.monotonic() < deadline, "the paused prompt never reached the model"
        time.sleep(0.5)
    assert follower.poll() is None, "the follower ended while the turn was still in flight"
    out, err = follower.communicate(timeout=900)
    assert follower.returncode == 0, out + err
    assert out.startswith(before), "the follower did not start with the saved transcript"
    live = [json.loads(line) for line in out[len(before) :].splitlines()]
    assert [e["type"] for e in live][-1] == "idle" and live.count(live[-1]) == 1
    # The prompt, then the answer (the stand-in calls its tool only in a conversation without a tool result yet).
    texts = [(e["role"], e["text"]) for e in live if e["type"] == "text"]
    assert texts[0][0] == "user" and PAUSE_MARK in texts[0][1], live
    assert ("assistant", "I wrote hello.txt.") in texts, live
    saved = benv.cli("session", "logs", "coder", session, "--json", check=True).stdout
    assert out == saved, "what was followed differs from the transcript the daemon kept"


def check_in_the_browser(benv: BangerEnv, session: str, tmp_path: Path) -> None:
    """The web UI on the agent VM, in a real browser: the session's transcript, then a prompt typed into the page
    whose turn streams into it. The UI runs in the root namespace (it reaches the daemon by its socket; the browser
    reaches the UI on loopback)."""
    from playwright.sync_api import expect

    from tests.ui.browser import chromium, screenshot
    from tests.ui.conftest import run_ui

    wrote = "I wrote hello.txt."
    ui_env = BangerEnv(home=benv.home, env=dict(benv.env))
    with run_ui(ui_env, tmp_path / "xdg") as ui, chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(ui.login_url)
        page.goto(f"{ui.base}/#/vm/coder")
        page.locator("#sessions a", has_text=session).click()
        transcript = page.locator("#transcript")
        expect(transcript).to_contain_text("[tool write: completed]", timeout=60_000)
        expect(transcript).to_contain_text("[idle]")
        before = transcript.inner_text().count(wrote)
        screenshot(page, "agent", "1-transcript")
        prompt = page.locator("#sessions form").filter(has=page.locator("input[name=text]"))
        prompt.locator("input[name=text]").fill("Create hello.txt from the page")
        prompt.locator("button[type=submit]").click()
        page.wait_for_function(
            f"document.querySelector('#transcript').textContent.split({json.dumps(wrote)}).length - 1 > {before}",
            timeout=1_800_000,
        )
        expect(transcript).to_contain_text("user: Create hello.txt from the page")
        page.wait_for_function(
            "document.querySelector('#transcript').textContent.trimEnd().endsWith('[idle]')", timeout=600_000
        )
        screenshot(page, "agent", "2-prompted")


def test_prompt_makes_the_agent_write_a_file(debian_kernel: Path, debian_image: Path, tmp_path: Path) -> None:
    ns = f"banger-test-a{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    record = tmp_path / "requests.json"
    standin = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        repo = make_repo(tmp_path, "proj")
        args = json.dumps({"filePath": "/workspace/proj/hello.txt", "content": "hello from the agent\n"})
        standin = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.agents.standin_model", "--port", str(PORT)]
            + ["--tool", "write", "--args", args, "--text", "I wrote hello.txt.", "--record", str(record)],
            cwd=REPO,
        )
        with installed_home(debian_kernel, wrap=("ip", "netns", "exec", ns)) as benv:
            OPENCODE_CACHE.mkdir(parents=True, exist_ok=True)
            (benv.home / "cache" / "agents").symlink_to(OPENCODE_CACHE)
            benv.env.update(
                BANGER_AGENT_BASE_URL=f"http://127.0.0.1:{PORT}/v1",
                BANGER_AGENT_MODEL="standin",
                BANGER_AGENT_API_KEY=KEY,
            )
            # One command: an agent VM holding the checkout, a prompt, the transcript, exit 0 once the agent is
            # idle. --net none: the provider is reached through the reverse tunnel alone.
            run = benv.cli(
                "vm", "run", "--name", "coder", "--agent", "opencode", "--net", "none", "--workspace", str(repo),
                "--prompt", "Create hello.txt", timeout=2400,
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
            assert "[tool write: completed]" in run.stdout and "I wrote hello.txt." in run.stdout
            info = json.loads(benv.cli("vm", "show", "coder", "--json", check=True).stdout)
            # Agent VM defaults, its image a cached derived image that holds the binary (nothing copied per VM),
            # and the server as a supervised session of kind `agent`, started in the workspace.
            assert info["state"] == "running" and info["vcpus"] == 2 and info["memory_mib"] == 2048
            images = {i["name"]: i for i in json.loads(benv.cli("image", "list", "--json", check=True).stdout)}
            assert info["image"].startswith("debian-bookworm-opencode-"), info["image"]
            assert images[info["image"]]["source"] == "derived:debian-bookworm"
            procs = benv.cli("vm", "exec", "coder", "--", "ps", "-eo", "pid=,args=", check=True).stdout.splitlines()
            server_pid = next(line.split()[0] for line in procs if "serve --hostname 127.0.0.1" in line)
            cwd = benv.cli("vm", "exec", "coder", "--", "readlink", f"/proc/{server_pid}/cwd", check=True).stdout
            assert cwd.strip() == "/workspace/proj", procs
            # The edit comes back as a branch of the host checkout.
            wrote = benv.cli("vm", "exec", "coder", "--", "cat", "hello.txt", check=True).stdout
            assert wrote == "hello from the agent\n"
            benv.cli("vm", "workspace", "export", "coder", check=True, timeout=600)
            assert git(repo, "show", "banger/coder:hello.txt") == "hello from the agent\n"
            rows = json.loads(benv.cli("session", "ls", "coder", "--json", check=True).stdout)
            server = next(row for row in rows if row["name"] == "opencode")
            assert (server["kind"], server["state"]) == ("agent", "running")
            assert server["command"][:2] == ["opencode", "serve"]
            # The server's password stays with the daemon: not in `vm show`, not in the guest's argv.
            shown = benv.cli("vm", "show", "coder", "--json", check=True).stdout
            password = json.loads((Path(json.loads(shown)["dir"]) / "agent.json").read_text())["password"]
            assert password not in shown
            ps = benv.cli("vm", "exec", "coder", "--", "ps", "-eo", "args", check=True).stdout
            assert "opencode serve" in ps and password not in ps
            # Bound to the guest's loopback only, and banger's own port is not forwarded automatically.
            ports = json.loads(benv.cli("vm", "ports", "coder", "--json", check=True).stdout)
            server_port = next(p for p in ports if p["port"] == 4096)
            assert server_port["address"] == "127.0.0.1" and server_port.get("host_port") is None
            name = benv.cli("session", "start", "coder", "--agent", "opencode", "--title", "demo", check=True)
            session = name.stdout.strip()
            benv.cli("vm", "exec", "coder", "--", "rm", "hello.txt", check=True)
            turn = benv.cli("session", "send", "coder", session, "Create hello.txt again", "--wait", timeout=1800)
            assert turn.returncode == 0, turn.stdout + turn.stderr
            assert "[tool write: completed]" in turn.stdout and "I wrote hello.txt." in turn.stdout
            content = benv.cli("vm", "exec", "coder", "--", "cat", "/workspace/proj/hello.txt", check=True).stdout
            assert content == "hello from the agent\n"
            logs = benv.cli("session", "logs", "coder", session, check=True).stdout
            assert "[tool write: completed]" in logs and "I wrote hello.txt." in logs and "[idle]" in logs
            events = [
                json.loads(x) for x in benv.cli("session", "logs", "coder", session, "--json").stdout.split("\n") if x
            ]
            assert all("type" in e and "time" in e for e in events) and events[-1]["type"] == "idle"
            check_logs_follow_json(benv, session, record)
            check_in_the_browser(benv, session, tmp_path)
            check_ctrl_c_aborts_the_turn(benv, session, record)
            # The key reached the provider, added by the host; it is nowhere in the guest.
            seen = json.loads(record.read_text())
            assert any(req["headers"].get("authorization") == f"Bearer {KEY}" for req in seen)
            # The key goes to the searching process on stdin: on its command line it would find itself.
            leak = benv.cli("vm", "exec", "-i", "coder", "--", "python3", "-c", LEAK_SCAN, input=KEY, timeout=600)
            assert leak.returncode == 0 and leak.stdout == "scanned\n", leak.stdout + leak.stderr
            assert KEY not in benv.cli("vm", "show", "coder", "--json", check=True).stdout
            for db in benv.home.glob("banger.db*"):
                assert KEY.encode() not in db.read_bytes()
    finally:
        if standin is not None:
            standin.kill()
            standin.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
