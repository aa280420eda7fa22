"""The server extension, through a real Jupyter Server: the remote kernels' status for
JupyterLab (one long poll for all kernels), the choices a kernelspec offers and their
check before anything starts, the Prometheus metrics and the kernel's own log."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from ssh_provisioner.throwaway import free_port

from ..netns import Link
from .jupyter_server import (
    STATUS,
    iopub_connected,
    metrics,
    start_server,
    status_of,
    status_until,
    write_kernelspec,
)

pytestmark = [pytest.mark.sshd, pytest.mark.e2e, pytest.mark.usefixtures("no_leaks")]


async def test_the_status_follows_a_kernel_through_a_cut_link(
    tmp_path: Path, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    """Where the kernel runs, then the link down and being retried, then reattached:
    each change reaches a waiting poll at once; /metrics counts them; the kernel's stderr
    is in the server's log at kernel_log_level, with its id and host."""
    from ..kit import resilient

    link, config = host_behind_a_link
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "gpu-box", resilient(config, kernel_log_level="warning"))
    server = start_server(tmp_path, path, log_level="INFO")
    try:
        kernel = await server.request("POST", "/api/kernels", {"name": "gpu-box"})
        kernel_id = kernel["id"]
        anonymous = await server.http.fetch(f"{server.url}{STATUS}", raise_error=False)
        assert anonymous.code == 403  # Jupyter Server's own auth: no token, no status
        with pytest.raises(HTTPClientError) as malformed:
            await server.request("GET", f"{STATUS}?since=latest")
        assert malformed.value.code == 400
        version, entry = await status_of(server, kernel_id)
        alias = config["hosts"][0]
        assert entry["phase"] == "running"
        assert entry["host"]["alias"] == alias
        assert entry["host"]["hostname"]  # the host's own name, from the launcher
        assert entry["host"]["user"] == "root"
        assert entry["link"]["state"] == "connected"
        assert entry["transport"] == "tcp"
        assert entry["kernelspec"] == "gpu-box"
        samples = await metrics(server)
        assert samples[f'ssh_provisioner_kernels{{host="{alias}",phase="running"}}'] == 1
        assert samples['ssh_provisioner_start_seconds_count{kind="cold"}'] == 1

        channels = await server.channels(kernel_id)
        try:
            await iopub_connected(channels)
            code = "import os; os.write(2, b'a line on stderr\\n')"  # the process's own fd 2
            await channels.collect(channels.execute(code))
            poll = asyncio.ensure_future(status_of(server, kernel_id, version))
            await asyncio.sleep(0.5)
            assert not poll.done()  # nothing changed: the poll waits
            link.down()
            try:
                entry = await status_until(
                    server, kernel_id, lambda e: e["phase"] == "link-down", 30, "link down"
                )
                assert entry["link"]["state"] == "down"
                assert entry["link"]["retry_until"] > entry["link"]["since"]
                await poll  # the first change ended the waiting poll
            finally:
                link.up()
            entry = await status_until(
                server, kernel_id, lambda e: e["phase"] == "running", 60, "reattached"
            )
            assert entry["link"]["reattached"] >= entry["link"]["since"] - 1
            messages = await channels.collect(channels.execute("print(6 * 7)"))
            assert any(m["content"].get("text") == "42\n" for m in messages)
        finally:
            channels.close()
        samples = await metrics(server)
        assert samples[f'ssh_provisioner_reconnects_total{{host="{alias}"}}'] == 1
        assert samples[f'ssh_provisioner_reattaches_total{{host="{alias}"}}'] == 1
        to_client = f'ssh_provisioner_relayed_bytes_total{{direction="to_client",host="{alias}"}}'
        assert samples[to_client] > 1000  # the replies, the output, the status messages
        assert re.search(rf"kernel {kernel_id} on \S+: a line on stderr", server.log())
        await server.request("DELETE", f"/api/kernels/{kernel_id}")
        _, entry = await status_of(server, kernel_id)
        assert entry == {}  # the server no longer has it: nor does its status
    finally:
        server.stop()


async def test_choices_are_checked_before_anything_starts_and_kept_on_restart(
    tmp_path: Path, trio_config: dict[str, Any]
) -> None:
    config = {**trio_config, "user_options": {"host": {"label": "Host"}}}
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "pool", config)
    write_kernelspec(path, "plain", trio_config)
    server = start_server(tmp_path, path)
    try:
        specs = (await server.request("GET", "/ssh-provisioner/api/kernelspecs"))["kernelspecs"]
        assert list(specs) == ["pool"]  # only the kernelspecs that offer a choice
        (option,) = specs["pool"]["options"]
        assert option["name"] == "host"
        assert option["choices"] == trio_config["hosts"]
        assert option["default"] is None  # left to the policy

        for chosen, said in (
            ({"host": "elsewhere"}, "'elsewhere' is not one of"),
            ({"gpus": 2}, "gpus cannot be chosen here"),
        ):
            with pytest.raises(HTTPClientError) as refused:
                await server.request(
                    "POST", "/ssh-provisioner/api/kernels", {"name": "pool", "options": chosen}
                )
            assert refused.value.code == 400
            message = json.loads(refused.value.response.body)["message"]  # type: ignore[union-attr]
            assert said in message
            assert message.startswith("kernelspec 'Remote pool': ")
            assert await server.request("GET", "/api/kernels") == []  # nothing started

        second = trio_config["hosts"][1]
        kernel = await server.request(
            "POST", "/ssh-provisioner/api/kernels", {"name": "pool", "options": {"host": second}}
        )
        _, entry = await status_of(server, kernel["id"])
        assert entry["host"]["alias"] == second
        assert entry["choices"] == {"host": second}
        await server.request("POST", f"/api/kernels/{kernel['id']}/restart")
        _, entry = await status_of(server, kernel["id"])
        assert entry["host"]["alias"] == second
        assert entry["choices"] == {"host": second}
        assert entry["phase"] == "running"
        await server.request("DELETE", f"/api/kernels/{kernel['id']}")
    finally:
        server.stop()


async def test_a_failover_shows_where_it_failed_and_is_counted(
    tmp_path: Path, trio_config: dict[str, Any]
) -> None:
    closed = f"root@127.0.0.2:{free_port('127.0.0.2')}"  # nothing listens there
    config = {
        **trio_config,
        "hosts": [closed, trio_config["hosts"][0]],
        "policy": "first-available",
    }
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "pair", config)
    server = start_server(tmp_path, path)
    try:
        kernel = await server.request("POST", "/api/kernels", {"name": "pair"})
        _, entry = await status_of(server, kernel["id"])
        assert entry["host"]["alias"] == trio_config["hosts"][0]
        assert entry["failover"]["from"] == closed
        assert "refused" in entry["failover"]["why"]
        samples = await metrics(server)
        assert samples[f'ssh_provisioner_failovers_total{{host="{closed}"}}'] == 1
        await server.request("DELETE", f"/api/kernels/{kernel['id']}")
    finally:
        server.stop()
