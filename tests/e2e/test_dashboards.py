"""A dashboard a remote kernel serves, seen through a real Jupyter Server with
jupyter-server-proxy: the cell's output names its /proxy/PORT/ URL, which serves it."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from ..kit import DASHBOARD_CELL, STOP_DASHBOARD
from ..netns import Link
from .jupyter_server import Channels, iopub_connected, start_server, status_of, write_kernelspec

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


async def notice_for(channels: Channels, port: int, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        message = await channels.receive(max(0.1, deadline - time.monotonic()))
        text = message["content"].get("text", "") if message["msg_type"] == "stream" else ""
        if f"[ssh-provisioner] port {port} on" in text:
            return str(text)


async def test_a_dashboard_through_jupyter_server_proxy(
    tmp_path: Path, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    _, config = host_behind_a_link
    jupyter_path = tmp_path / "share" / "jupyter"
    write_kernelspec(jupyter_path, "remote", config)
    server = start_server(tmp_path, jupyter_path)
    channels: Channels | None = None
    try:
        session = await server.request(
            "POST", "/api/sessions",
            {"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "remote"}},
        )  # fmt: skip
        channels = await server.channels(session["kernel"]["id"])
        await iopub_connected(channels)
        cell = DASHBOARD_CELL.format(bind="127.0.0.1", port=0, big=0)
        messages = await channels.collect(channels.execute(cell))
        port = int(next(m for m in messages if m["msg_type"] == "stream")["content"]["text"])
        text = await notice_for(channels, port)
        found = re.search(r"http://127\.0\.0\.1:(\d+)", text)
        assert found, text
        local = int(found.group(1))
        assert f", and through Jupyter at /proxy/{local}/" in text
        page = await server.http.fetch(
            f"{server.url}/proxy/{local}/index.html",
            headers={"Authorization": f"token {server.token}"},
        )
        assert page.body == b"served on the host"
        # the status panel links it, both ways
        _, entry = await status_of(server, session["kernel"]["id"])
        assert entry["forwards"][str(port)] == {
            "url": f"http://127.0.0.1:{local}/", "proxy": f"/proxy/{local}/"
        }  # fmt: skip
        await channels.collect(channels.execute(STOP_DASHBOARD))
        await server.request("DELETE", f"/api/sessions/{session['id']}")
    finally:
        if channels is not None:
            channels.close()
        server.stop()
