"""Debian's chromium driven by Playwright (never a downloaded browser), with screenshots kept as artifacts."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
ARTIFACTS = Path(os.environ.get("BANGER_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")) / "ui"


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """A headless chromium with a fresh profile directory; every dialog (confirmations) is accepted."""
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=ARGS, viewport={"width": 1280, "height": 900}
        )
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


def accept_dialogs(page: Page, seen: list[str]) -> None:
    """Accept confirm() dialogs, recording their questions."""

    def on_dialog(dialog: object) -> None:
        seen.append(dialog.message)  # type: ignore[attr-defined]
        dialog.accept()  # type: ignore[attr-defined]

    page.on("dialog", on_dialog)


def screenshot(page: Page, test: str, step: str) -> Path:
    """Save a full-page screenshot under test-artifacts/ui/ (printed, so a failing run shows where)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', test)}-{step}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
