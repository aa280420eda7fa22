"""Headless Chromium for the browser tests (Debian's, driven by Playwright), and what a
user does in JupyterLab: wait for the notebook's kernel, type a cell and run it."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..conftest import IN_CI

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Locator, Page, Request, WebSocket

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
# Screenshots land here; CI keeps the directory as its artifacts.
ARTIFACTS = Path(os.environ.get("SSHP_TEST_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))


@asynccontextmanager
async def open_browser() -> AsyncIterator[BrowserContext]:
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing: apt-get install chromium"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    profile = tempfile.mkdtemp(prefix="sshp-chromium-")
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch_persistent_context(
                profile,  # a fresh --user-data-dir
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 900},
            )
            # what the browser could not fetch, and why (net::ERR_...), in a failed
            # test's captured output: JupyterLab's own "Error Loading Theme" once came
            # from a stylesheet request that never reached the server
            browser.on(
                "requestfailed",
                lambda request: print(f"browser: {request.url} failed: {request.failure}"),
            )
            try:
                yield browser
            finally:
                await browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def open_lab(page: Page, url: str, card: str) -> Locator:
    """JupyterLab at ``url``, up to its launcher card for the kernelspec ``card``.

    Loaded again when Chromium dropped requests as the page loaded, with
    net::ERR_NETWORK_CHANGED, and only then: the suite's other tests add and remove
    network interfaces (namespaces, veths) all the time, Chromium takes each for a
    change of network and fails what is in flight, and JupyterLab then shows "Error
    Loading Theme" over the page (seen in CI).  A user's machine does not change its
    interfaces every few seconds; this rig does."""
    dropped: list[str] = []

    def on_failed(request: Request) -> None:
        if "ERR_NETWORK_CHANGED" in str(request.failure):
            dropped.append(request.url)

    page.on("requestfailed", on_failed)
    try:
        for _ in range(3):
            dropped.clear()
            await page.goto(url)
            found = page.locator(".jp-LauncherCard[data-category='Notebook']", has_text=card)
            await found.wait_for(timeout=60_000)
            if not dropped:
                return found
        raise AssertionError(f"Chromium kept losing its requests to network changes: {dropped}")
    finally:
        page.remove_listener("requestfailed", on_failed)


def kernel_connected(page: Page) -> asyncio.Future[None]:
    """Resolves when the page's kernel websocket delivers its first kernel_info_reply: the
    notebook is connected to its kernel.  A cell run before that is silently dropped by
    JupyterLab (the launcher card shows the notebook, and even an idle indicator, first)."""
    connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_websocket(websocket: WebSocket) -> None:
        def on_frame(frame: str | bytes) -> None:
            data = frame if isinstance(frame, bytes) else frame.encode()
            if b"kernel_info_reply" in data and not connected.done():
                connected.set_result(None)

        if "/channels" in websocket.url:
            websocket.on("framereceived", on_frame)

    page.on("websocket", on_websocket)
    return connected


async def run_cell(page: Page, code: str) -> Locator:
    """Type ``code`` into the active notebook's last cell and run it; returns the cell's
    output area once something is in it."""
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    cell = cells.nth(await cells.count() - 1)  # fixed: Shift+Enter appends a new last cell
    await cell.locator(".cm-content").click()
    await page.keyboard.type(code)
    await page.keyboard.press("Shift+Enter")
    output = cell.locator(".jp-OutputArea-output")
    await output.first.wait_for(timeout=60_000)
    return output
