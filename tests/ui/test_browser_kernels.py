"""The kernels page in a real browser: catalog with STATE, a pull whose progress bar reaches 100%, rm."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import expect

from tests.conftest import BangerEnv
from tests.kernels.pull.conftest import LoopbackServer, http_server  # noqa: F401  (fixture)
from tests.ui.browser import accept_dialogs, chromium, screenshot
from tests.ui.catalog import serve_catalog
from tests.ui.conftest import run_ui


def test_pull_progress_bar_reaches_100_then_rm(
    daemon: BangerEnv,
    tmp_path: Path,
    http_server: LoopbackServer,  # noqa: F811
) -> None:
    # Paced (16 chunks, 0.15 s apart): on an idle host a loopback pull is otherwise over before the page sees it move.
    catalog = serve_catalog(http_server, tmp_path / "c.json", ["k1"], filler=16 << 20, chunk_delay=0.15)
    daemon.env["BANGER_CATALOG"] = str(catalog)
    with run_ui(daemon, tmp_path / "xdg") as ui, chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        dialogs: list[str] = []
        accept_dialogs(page, dialogs)
        page.goto(ui.login_url + "#/kernels")
        expect(page.locator("#live")).to_have_text("live")
        row = page.locator("#catalog-k1")
        expect(row.locator(".kstate")).to_have_text("available")
        screenshot(page, "kernels", "1-catalog")
        # Record every width the bar takes, to show it moved on progress events rather than jumping at the end.
        page.evaluate(
            """() => { window.widths = []; const bar = document.querySelector('#catalog-k1 .progress > div');
            new MutationObserver(() => window.widths.push(bar.style.width)).observe(bar, {attributes: true}); }"""
        )
        row.locator("button[data-action=pull]").click()
        expect(page.locator("#catalog-k1 .pct")).to_have_text("100%")
        expect(page.locator("#catalog-k1 .kstate")).to_have_text("pulled")
        expect(page.locator("#kernel-k1")).to_be_visible()
        widths = page.evaluate("window.widths")
        assert widths[-1] == "100%" and any(w not in ("0%", "100%") for w in widths), widths
        screenshot(page, "kernels", "2-pulled")
        assert daemon.cli("kernel", "list", "--json", check=True).stdout.count('"name": "k1"') == 1
        page.locator("#kernel-k1 button[data-action=rm]").click()
        expect(page.locator("#kernel-k1")).to_have_count(0)
        expect(page.locator("#catalog-k1 .kstate")).to_have_text("available")
        assert dialogs == ["Remove kernel k1?"]
        assert '"k1"' not in daemon.cli("kernel", "list", "--json", check=True).stdout
        # Pulled and removed by the CLI while the page is open: the page follows without a reload.
        daemon.cli("kernel", "pull", "k1", check=True)
        expect(page.locator("#kernel-k1")).to_be_visible()
        daemon.cli("kernel", "rm", "k1", check=True)
        expect(page.locator("#kernel-k1")).to_have_count(0)
        # A daemon error shows in the page as the CLI prints it, not as a blank page.
        page.goto(ui.base + "/#/vm/nope")
        expect(page.locator("#vm-details .error")).to_contain_text("error: no VM named 'nope'")
        expect(page.locator("#vm-details .error")).to_contain_text("hint: see `banger vm ls`")
        screenshot(page, "kernels", "3-error")
