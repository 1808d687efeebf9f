"""
Debian's chromium driven by playwright, for the browser tests.

Only the Python package ``playwright`` is used, never ``playwright install``:
the browser is the system's ``/usr/bin/chromium`` (apt package ``chromium``,
installed by ``scripts/setup --test``), or the one ``$CHROMIUM`` names.

These helpers are blocking (playwright's sync API): the browser tests are
plain pytest tests, not reactor tests, so real nodes are waited on by blocking
(``NodeProcess.block_until_ready``, ``tests.helpers.poll``), not with Deferreds.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync"]
#: the longest any single playwright action or wait may take, in milliseconds
DEFAULT_TIMEOUT_MS = 15_000


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"chromium is not installed at {CHROMIUM} (apt-get install chromium, or scripts/setup --test)"
    if importlib.util.find_spec("playwright") is None:
        return "the Python package playwright is not installed (pip install playwright; no browser download needed)"
    return None


needs_chromium = pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or "")


@contextmanager
def chromium_page(viewport: tuple[int, int] = (1280, 900)) -> Iterator[Page]:
    """A fresh page in a headless system chromium; closed (with the browser) on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True,
                                     timeout=DEFAULT_TIMEOUT_MS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            page = context.new_page()
            page.set_default_timeout(DEFAULT_TIMEOUT_MS)
            page.set_default_navigation_timeout(DEFAULT_TIMEOUT_MS)
            yield page
            context.close()
        finally:
            browser.close()


class PageErrors:
    """Collects a page's uncaught exceptions and console errors (a missing favicon is not one)."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)


def node_args(store: Path, *extra: str) -> list[str]:
    """Arguments of a loopback node on free ports with a ``file:`` store."""
    return ["--store", f"file:{store}", "--min-free", "0",
            "--http", f"tcp:{free_port()}:interface=127.0.0.1",
            "--peer", f"tcp:{free_port()}:interface=127.0.0.1", *extra]
