"""path_map through a real Jupyter Server: a notebook in a mapped folder gets its kernel in
the host's folder, /api/resolvePath maps the kernel's paths back, a notebook elsewhere
starts in remote_cwd, and a mapped folder missing on the host falls back, with a log
line saying why."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from .jupyter_server import Server, iopub_connected, start_server, write_kernelspec

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


async def kernel_cwd(server: Server, notebook: str) -> tuple[str, str]:
    """Start a kernel for ``notebook``; (its kernel id, its working directory)."""
    session = await server.request(
        "POST", "/api/sessions",
        {"path": notebook, "type": "notebook", "kernel": {"name": "remote"}},
    )  # fmt: skip
    kernel_id = session["kernel"]["id"]
    channels = await server.channels(kernel_id)
    try:
        await iopub_connected(channels)
        messages = await channels.collect(channels.execute("import os; print(os.getcwd())"))
        cwd = next(m for m in messages if m["msg_type"] == "stream")["content"]["text"].strip()
    finally:
        channels.close()
    return kernel_id, cwd


@pytest.mark.parametrize("login", ["root"], indirect=True)
async def test_a_notebook_in_a_mapped_folder_runs_and_resolves_there(
    tmp_path: Path, host_config: dict[str, Any]
) -> None:
    notebooks = tmp_path / "notebooks"
    for folder in ("proj/sub", "other", "gone"):
        (notebooks / folder).mkdir(parents=True)
    on_host = tmp_path / "on-the-host"  # the same files, under another path there
    (on_host / "proj" / "sub").mkdir(parents=True)
    elsewhere = tmp_path / "remote-cwd"
    elsewhere.mkdir()
    config = {
        **host_config,
        "remote_cwd": str(elsewhere),
        "path_map": [
            {"local": str(notebooks / "proj"), "remote": str(on_host / "proj")},
            {"local": str(notebooks / "gone"), "remote": str(tmp_path / "not-on-the-host")},
        ],
    }
    jupyter_path = tmp_path / "share" / "jupyter"
    write_kernelspec(jupyter_path, "remote", config)
    server = start_server(tmp_path, jupyter_path)
    try:
        kernel_id, cwd = await kernel_cwd(server, "proj/sub/nb.ipynb")
        assert cwd == str(on_host / "proj" / "sub")
        for asked, expected in [
            ("data.csv", notebooks / "proj" / "sub" / "data.csv"),
            ("../x.py", notebooks / "proj" / "x.py"),
        ]:
            query = urllib.parse.urlencode({"kernel": kernel_id, "path": asked})
            answer = await server.request("GET", f"/api/resolvePath?{query}")
            kernel_scope = [r["path"] for r in answer["resolved"] if r["scope"] == "kernel"]
            assert kernel_scope == [str(expected)], json.dumps(answer)
        query = urllib.parse.urlencode({"kernel": kernel_id, "path": "/etc/passwd"})
        answer = await server.request("GET", f"/api/resolvePath?{query}")
        assert not [r for r in answer["resolved"] if r["scope"] == "kernel"]  # maps to nothing

        _, cwd = await kernel_cwd(server, "other/nb.ipynb")
        assert cwd == str(elsewhere)
        _, cwd = await kernel_cwd(server, "gone/nb.ipynb")
        assert cwd == str(elsewhere)
        deadline = time.monotonic() + 10
        while "by path_map) is not a directory here; started in" not in server.log():
            assert time.monotonic() < deadline, server.log()[-3000:]
            await asyncio.sleep(0.05)
        assert f"the notebook's folder {notebooks / 'other'} is in no path_map folder" in (
            server.log()
        )
        for kernel in await server.request("GET", "/api/kernels"):
            await server.request("DELETE", f"/api/kernels/{kernel['id']}")
    finally:
        server.stop()
