"""The VMs pages in a real browser against a real QEMU guest: a VM appears and changes state live, start and stop
from the page, a terminal that echoes, the console tail, and the API's objects equal to `--json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import BangerEnv
from tests.ui.browser import accept_dialogs, chromium, screenshot
from tests.ui.conftest import UiServer, run_ui
from tests.vms.conftest import debian_image, debian_kernel, vm_home  # noqa: F401  (fixtures)

pytestmark = pytest.mark.vm
BOOT = 300_000  # ms: TCG boots on a shared, busy host


@pytest.fixture
def ui_vm(vm_home: BangerEnv, tmp_path: Path) -> Iterator[UiServer]:  # noqa: F811
    with run_ui(vm_home, tmp_path / "xdg") as server:
        yield server


def _terminal_lines(page: Page) -> list[str]:
    return [str(t).strip() for t in page.locator("#terminal .xterm-rows > div").all_inner_texts()]


def _row_starting(prefix: str) -> str:
    """A page function: true once a terminal row starts with `prefix`."""
    return f"""() => [...document.querySelectorAll('#terminal .xterm-rows > div')]
                 .some((r) => r.textContent.trim().startsWith('{prefix}'))"""


def test_vm_lifecycle_and_terminal_in_the_browser(ui_vm: UiServer, tmp_path: Path) -> None:
    benv = ui_vm.benv
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        dialogs: list[str] = []
        accept_dialogs(page, dialogs)
        page.goto(ui_vm.login_url)
        expect(page.locator("#live")).to_have_text("live")
        expect(page.locator("#vm-rows")).to_contain_text("no VMs")

        # Created from the CLI while the page is open: it appears without a reload.
        benv.cli("vm", "create", "--no-start", "--name", "web1", check=True)
        row = page.locator("#vm-row-web1")
        expect(row.locator(".state")).to_have_text("created")
        screenshot(page, "vms", "1-created")

        row.locator("button[data-action=start]").click()
        expect(row.locator(".state")).to_have_text("starting")
        expect(row.locator(".state")).to_have_text("running", timeout=BOOT)
        show = json.loads(benv.cli("vm", "show", "web1", "--json", check=True).stdout)
        expect(row).to_contain_text(show["ip"])
        expect(row.locator("td.uptime")).to_have_text(re.compile(r"^\d+m\d\ds$"))
        screenshot(page, "vms", "2-running")

        with ui_vm.client() as client:
            assert client.get("/api/vms").json() == json.loads(benv.cli("vm", "ls", "--json", check=True).stdout)
            assert client.get("/api/vms/web1").json() == json.loads(
                benv.cli("vm", "show", "web1", "--json", check=True).stdout
            )

        row.locator("a", has_text="web1").click()
        expect(page.locator("#terminal-status")).to_have_text("connected")
        page.locator("#terminal").click()
        page.keyboard.type("echo hi\n")
        page.wait_for_function(
            """() => [...document.querySelectorAll('#terminal .xterm-rows > div')]
                 .some((r) => r.textContent.trim() === 'hi')""",
            timeout=120_000,
        )
        assert "hi" in _terminal_lines(page)
        # The window shrinks: the terminal refits and the guest's PTY follows.
        cols = page.evaluate("window.bangerTerminal.cols")
        page.set_viewport_size({"width": 700, "height": 800})
        page.wait_for_function(f"window.bangerTerminal.cols < {cols}")
        size = f"{page.evaluate('window.bangerTerminal.rows')} {page.evaluate('window.bangerTerminal.cols')}"
        page.keyboard.type("stty size\n")
        page.wait_for_function(
            f"""() => [...document.querySelectorAll('#terminal .xterm-rows > div')]
                 .some((r) => r.textContent.trim() === '{size}')""",
            timeout=60_000,
        )
        expect(page.locator("#console")).not_to_be_empty()
        expect(page.locator("#vm-ports table")).to_be_visible()
        # The shell is a guest session, listed with the VM's sessions.
        shell = page.evaluate("window.bangerTerminal.shellSession")
        assert shell.startswith("shell-")
        expect(page.locator("#sessions")).to_contain_text(shell)
        screenshot(page, "vm-page", "3-terminal")

        # A reload reattaches to the same shell: the screen is redrawn and the shell's pid is the same.
        page.keyboard.type("echo pid=$$\n")
        page.wait_for_function(_row_starting("pid="), timeout=60_000)
        pid_line = next(line for line in _terminal_lines(page) if line.startswith("pid="))
        page.reload()
        expect(page.locator("#terminal-status")).to_have_text("connected", timeout=60_000)
        page.wait_for_function(f"window.bangerTerminal.shellSession === '{shell}'", timeout=60_000)
        page.wait_for_function(_row_starting("pid="), timeout=60_000)  # replayed
        page.locator("#terminal").click()
        page.keyboard.type("echo again=$$\n")
        page.wait_for_function(_row_starting("again="), timeout=60_000)
        assert pid_line.replace("pid=", "again=") in _terminal_lines(page)
        # "New shell" ends the old shell's session and starts another.
        page.locator("#terminal-slot button", has_text="New shell").click()
        expect(page.locator("#terminal-status")).to_have_text("connected", timeout=60_000)
        page.wait_for_function(f"(window.bangerTerminal.shellSession || '{shell}') !== '{shell}'")
        names = [row["name"] for row in json.loads(benv.cli("session", "ls", "web1", "--json", check=True).stdout)]
        assert shell not in names and page.evaluate("window.bangerTerminal.shellSession") in names

        page.locator("#vm-details button[data-action=stop]").click()
        expect(page.locator("#vm-details .state")).to_have_text("stopped", timeout=120_000)
        expect(page.locator("#terminal-slot")).to_contain_text("a terminal opens when the VM runs")
        assert json.loads(benv.cli("vm", "show", "web1", "--json", check=True).stdout)["state"] == "stopped"
        screenshot(page, "vm-page", "4-stopped")

        page.locator("#vm-details button[data-action=delete]").click()
        expect(page.locator("#vm-rows")).to_contain_text("no VMs")
        assert dialogs == ["Stop VM web1?", "Remove VM web1 and all its files?"]
        assert json.loads(benv.cli("vm", "ls", "--json", check=True).stdout) == []


def test_create_form_reports_errors_in_page(ui_vm: UiServer, tmp_path: Path) -> None:
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(ui_vm.login_url)
        form = page.locator("#create-form")
        form.locator("input[name=name]").fill("Bad_Name!")
        form.locator("input[name=no_start]").check()
        form.locator("button[type=submit]").click()
        expect(page.locator("#errors .error")).to_contain_text("error: ")
        cli = ui_vm.benv.cli("vm", "create", "--no-start", "--name", "Bad_Name!")
        assert cli.returncode == 1
        expect(page.locator("#errors .error")).to_contain_text(cli.stderr.splitlines()[0])
        form.locator("input[name=name]").fill("formvm")
        form.locator("button[type=submit]").click()
        expect(page.locator("#vm-row-formvm .state")).to_have_text("created")
        assert httpx.get(ui_vm.base + "/api/vms").status_code == 401  # the browser's cookie is not ours
        screenshot(page, "vms", "5-form")
        ui_vm.benv.cli("vm", "rm", "formvm", check=True)
        expect(page.locator("#vm-row-formvm")).to_have_count(0)
        page.locator("nav a", has_text="Images").click()
        expect(page.locator("#image-debian-bookworm")).to_contain_text("debian")
        screenshot(page, "images", "1-list")
