"""JupyterLab in a real browser (Debian's headless chromium, driven by Playwright) runs a
notebook on a remote kernel, the way a user does: launcher card, type, Shift+Enter, and
the toolbar's interrupt button; our extension's status bar, panel and resource form;
a failed start's dialog."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..sshd import SSHDaemon, generate_key
from .browser import ARTIFACTS, kernel_connected, open_browser, open_lab, run_cell
from .jupyter_server import Server, start_server, write_kernelspec

if TYPE_CHECKING:
    from playwright.async_api import BrowserContext

pytestmark = [pytest.mark.sshd, pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]


@pytest.fixture
async def browser() -> AsyncIterator[BrowserContext]:
    async with open_browser() as context:
        yield context


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
    crash = "import sys; sys.stderr.write('ModuleNotFoundError: torch\\n'); sys.exit(3)"
    crashing = {**trio_config, "hosts": [host.destination("root")]}
    write_kernelspec(jupyter_path, "crashing", crashing, argv=["python3", "-c", crash])
    news = tmp_path / "config/lab/user-settings/@jupyterlab/apputils-extension"
    news.mkdir(parents=True)  # no "official Jupyter news?" toast over the screenshot
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    server = start_server(tmp_path, jupyter_path)
    yield server, host
    # After a failed start shown in JupyterLab, Jupyter Server sometimes never exits (in
    # about half the runs under load, also without this package's server extension: its
    # cleanup stalls among the extension apps, or the interpreter waits at exit for an
    # idle AnyIO worker thread).  These tests do not judge the server's exit: 15 s, not
    # 60, before the kill.  (test_jupyter_server.py judges a clean exit.)
    server.stop(wait=15)


async def test_a_notebook_in_jupyterlab_runs_on_the_remote_host(
    browser: BrowserContext, lab_server: tuple[Server, SSHDaemon]
) -> None:
    server, host = lab_server
    page = await browser.new_page()
    try:
        connected = kernel_connected(page)
        # the launcher's card for our kernelspec makes a notebook with that kernel
        card = await open_lab(page, f"{server.url}/lab?token={server.token}", "Remote gpu-box")
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
        card = await open_lab(page, f"{server.url}/lab?token={server.token}", "Remote pool …")
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


@pytest.mark.parametrize(
    ("kernelspec", "host", "said"),
    [
        # a changed host key: the host, the cause and what to do
        ("moved", 2, ("host key has CHANGED", "ssh-keygen -R")),
        # a kernel that dies starting: its own last words
        ("crashing", 1, ("exit", "ModuleNotFoundError: torch")),
    ],
)
async def test_a_failed_start_shows_the_host_and_the_cause_in_the_dialog(
    browser: BrowserContext,
    lab_server: tuple[Server, SSHDaemon],
    trio: list[SSHDaemon],
    kernelspec: str,
    host: int,
    said: tuple[str, ...],
) -> None:
    server, _ = lab_server
    page = await browser.new_page()
    try:
        url = f"{server.url}/lab?token={server.token}"
        card = await open_lab(page, url, f"Remote {kernelspec}")
        await card.click(timeout=60_000)
        dialog = page.locator(".jp-Dialog-content")
        await dialog.filter(has_text=said[-1]).wait_for(timeout=60_000)
        text = await dialog.inner_text()
        assert trio[host].destination("root") in text
        for words in said:
            assert words in text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await dialog.screenshot(path=ARTIFACTS / f"error-dialog-{kernelspec}.png")
        assert await server.request("GET", "/api/kernels") == []
    finally:
        await page.close()
