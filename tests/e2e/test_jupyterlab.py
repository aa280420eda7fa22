"""JupyterLab in a real browser (Debian's headless chromium, driven by Playwright) runs a
notebook on a remote kernel, the way a user does: launcher card, type, Shift+Enter, and
the toolbar's interrupt button."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..conftest import IN_CI
from ..sshd import SSHDaemon
from .jupyter_server import Server, start_server, write_kernelspec

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext, Locator, Page, WebSocket

pytestmark = [pytest.mark.sshd, pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
# Screenshots land here; CI keeps the directory as its artifacts.
ARTIFACTS = Path(os.environ.get("SSHP_TEST_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))


@pytest.fixture
async def browser() -> AsyncIterator[BrowserContext]:
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
            try:
                yield browser
            finally:
                await browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def lab_server(
    tmp_path: Path, trio: list[SSHDaemon], trio_config: dict[str, Any]
) -> Iterator[tuple[Server, SSHDaemon]]:
    host = trio[1]
    jupyter_path = tmp_path / "share" / "jupyter"
    write_kernelspec(jupyter_path, "gpu-box", {**trio_config, "hosts": [host.destination("root")]})
    news = tmp_path / "config/lab/user-settings/@jupyterlab/apputils-extension"
    news.mkdir(parents=True)  # no "official Jupyter news?" toast over the screenshot
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    server = start_server(tmp_path, jupyter_path)
    yield server, host
    server.stop()


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


async def test_a_notebook_in_jupyterlab_runs_on_the_remote_host(
    browser: BrowserContext, lab_server: tuple[Server, SSHDaemon]
) -> None:
    server, host = lab_server
    page = await browser.new_page()
    try:
        connected = kernel_connected(page)
        await page.goto(f"{server.url}/lab?token={server.token}")
        # the launcher's card for our kernelspec makes a notebook with that kernel
        card = page.locator(".jp-LauncherCard[data-category='Notebook']", has_text="Remote gpu-box")
        await card.click(timeout=60_000)
        await asyncio.wait_for(connected, 60)
        output = await run_cell(
            page,
            "import os, socket; print(socket.gethostname(), os.environ['SSH_CONNECTION'])",
        )
        hostname, *ssh_connection = (await output.first.inner_text()).split()
        assert hostname == "host-b"  # the host's own name, not this machine's
        assert ssh_connection[2:] == [host.address, str(host.port)]  # served by that host's sshd
        kernels = await server.request("GET", "/api/kernels")
        assert [k["name"] for k in kernels] == ["gpu-box"]
        # the toolbar's interrupt button stops a cell running on the host
        output = await run_cell(page, "import time; print('sleeping', flush=True); time.sleep(60)")
        await page.locator(
            ".jp-NotebookPanel:not(.lm-mod-hidden) [data-jp-item-name='interrupt'] button"
        ).click()
        await output.filter(has_text="KeyboardInterrupt").wait_for(timeout=10_000)
    finally:  # the page as it ended, passed or failed
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=ARTIFACTS / "jupyterlab-remote-kernel.png")
        await page.close()
