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
from ..sshd import SSHDaemon, generate_key
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
    # a kernelspec that lets its user choose the host, and one whose host key changed
    write_kernelspec(jupyter_path, "pool", {**trio_config, "user_options": {"host": {}}})
    impostor = generate_key(tmp_path / "impostor_key")
    known_hosts = tmp_path / "moved_known_hosts"
    known_hosts.write_text(trio[2].known_hosts_line(impostor) + "\n")
    options = {**trio_config["connect_options"], "known_hosts": str(known_hosts)}
    moved = {**trio_config, "hosts": [trio[2].destination("root")], "connect_options": options}
    write_kernelspec(jupyter_path, "moved", moved)
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
        # the status bar says where the kernel runs; a click opens the panel
        status = page.locator(".sshp-status")
        await status.filter(has_text=f"{host.destination('root')} (host-b)").wait_for(
            timeout=10_000
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.locator("#jp-main-statusbar").screenshot(path=ARTIFACTS / "status-bar.png")
        await status.click()
        panel = page.locator("#ssh-provisioner-panel")
        await panel.filter(has_text="Login user").wait_for(timeout=10_000)
        text = await panel.inner_text()
        assert "root" in text
        assert "connected" in text
        assert "tcp" in text
        await page.screenshot(path=ARTIFACTS / "status-panel.png")
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


async def test_the_resource_form_starts_the_kernel_where_the_user_chose(
    browser: BrowserContext, lab_server: tuple[Server, SSHDaemon], trio: list[SSHDaemon]
) -> None:
    """A kernelspec with user_options gets a launcher card that opens a form; the
    notebook it makes runs where the form said, and the status bar says so."""
    server, _ = lab_server
    chosen = trio[2].destination("root")
    page = await browser.new_page()
    try:
        connected = kernel_connected(page)
        await page.goto(f"{server.url}/lab?token={server.token}")
        card = page.locator(".jp-LauncherCard[data-category='Notebook']", has_text="Remote pool …")
        await card.click(timeout=60_000)
        form = page.locator(".jp-Dialog .sshp-form")
        await form.locator("select[name='host']").select_option(chosen)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.locator(".jp-Dialog-content").screenshot(path=ARTIFACTS / "resource-form.png")
        await page.locator(".jp-Dialog button", has_text="Start").click()
        await asyncio.wait_for(connected, 60)
        output = await run_cell(page, "import socket; print(socket.gethostname())")
        assert (await output.first.inner_text()).strip() == "host-c"
        await page.locator(".sshp-status", has_text=f"{chosen} (host-c)").wait_for(timeout=10_000)
        kernels = await server.request("GET", "/api/kernels")
        assert [k["name"] for k in kernels] == ["pool"]
    finally:
        await page.close()


async def test_a_failed_start_shows_the_host_and_the_cause_in_the_dialog(
    browser: BrowserContext, lab_server: tuple[Server, SSHDaemon], trio: list[SSHDaemon]
) -> None:
    server, _ = lab_server
    page = await browser.new_page()
    try:
        await page.goto(f"{server.url}/lab?token={server.token}")
        card = page.locator(".jp-LauncherCard[data-category='Notebook']", has_text="Remote moved")
        await card.click(timeout=60_000)
        dialog = page.locator(".jp-Dialog-content")
        await dialog.wait_for(timeout=60_000)
        await dialog.filter(has_text="CHANGED").wait_for(timeout=10_000)
        text = await dialog.inner_text()
        assert trio[2].destination("root") in text  # the host
        assert "ssh-keygen -R" in text  # and what to do
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await dialog.screenshot(path=ARTIFACTS / "error-dialog.png")
        assert await server.request("GET", "/api/kernels") == []
    finally:
        await page.close()
