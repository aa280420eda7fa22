"""Instant kernels through a real Jupyter Server: the server keeps a kernel ready from
its start, a notebook's session takes it (with the notebook's own JPY_SESSION_NAME),
another is made ready, and the server's stop ends the one still waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ..conftest import rig_config
from ..sshd import SSHDaemon
from .jupyter_server import Server, iopub_connected, metrics, start_server, status_of
from .jupyter_server import write_kernelspec as write

pytestmark = [pytest.mark.sshd, pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]


async def ready_kernels(server: Server, alias: str, count: int, timeout: float) -> None:
    """Until /metrics counts ``count`` kernels kept ready on ``alias`` (no event to
    await from another process: a scrape every 0.2 s, with a deadline)."""
    key = f'ssh_provisioner_kernels{{host="{alias}",phase="prespawned"}}'
    deadline = time.monotonic() + timeout
    while (await metrics(server)).get(key, 0) != count:
        assert time.monotonic() < deadline, f"never {count} kernel(s) ready on {alias}"
        await asyncio.sleep(0.2)


async def test_a_notebook_gets_the_kernel_kept_ready(
    tmp_path: Path, host_a: SSHDaemon, client_key: tuple[Path, str]
) -> None:
    config: dict[str, Any] = rig_config(host_a, client_key[0], prespawn=1, orphan_timeout=60.0)
    alias = config["hosts"][0]
    path = tmp_path / "share" / "jupyter"
    write(path, "instant", config)
    server = start_server(tmp_path, path, log_level="INFO")
    try:
        await ready_kernels(server, alias, 1, 60)  # before any notebook asked
        session = await server.request(
            "POST",
            "/api/sessions",
            {"path": "work/analysis.ipynb", "type": "notebook", "kernel": {"name": "instant"}},
        )
        kernel_id = session["kernel"]["id"]
        _, entry = await status_of(server, kernel_id)
        assert entry["start_kind"] == "prespawned"
        assert entry["phase"] == "running"
        assert entry["host"]["alias"] == alias
        assert entry["session_path"] == "work/analysis.ipynb"
        channels = await server.channels(kernel_id)
        try:
            await iopub_connected(channels)
            seen = await channels.collect(channels.execute("print(__session__)"))
            printed = "".join(m["content"]["text"] for m in seen if m["msg_type"] == "stream")
            assert printed.strip().endswith("work/analysis.ipynb"), seen
        finally:
            channels.close()
        await ready_kernels(server, alias, 1, 60)  # the next one
        samples = await metrics(server)
        assert samples['ssh_provisioner_start_seconds_count{kind="prespawned"}'] == 1
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    # no_leaks: the one still kept ready ended with the server, not by its orphan clock
    # (a minute here)
