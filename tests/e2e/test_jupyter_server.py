"""Jupyter Server runs remote kernels unchanged: REST, websocket channels, interrupt,
restart, culling, shutdown; and nbclient runs a notebook on one."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from ssh_provisioner.throwaway import free_port

from ..conftest import remote_leftovers
from ..helpers import SLEEPING_CELL, process_alive, wait_until
from ..netns import Link
from .jupyter_server import Channels, Server, iopub_connected, start_server, write_kernelspec

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


@pytest.fixture
def jupyter_path(tmp_path: Path, host_config: dict[str, Any]) -> Path:
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "remote", host_config)
    return path


@pytest.fixture
def server(tmp_path: Path, jupyter_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path, jupyter_path)
    yield running
    running.stop()


async def kernel_pid(channels: Channels) -> int:
    messages = await channels.collect(channels.execute("import os; print(os.getpid())"))
    return int(next(m for m in messages if m["msg_type"] == "stream")["content"]["text"])


async def test_rest_and_websocket_lifecycle(server: Server) -> None:
    await lifecycle(server)


async def test_the_classic_notebook_ui_nbclassic(tmp_path: Path, jupyter_path: Path) -> None:
    """nbclassic: the classic Notebook UI, on Jupyter Server (Notebook 6 itself needs
    jupyter_client < 8): its page lists the kernelspec, and the whole lifecycle runs."""
    server = start_server(tmp_path, jupyter_path, app="nbclassic")
    try:
        page = await server.http.fetch(
            f"{server.url}/tree", headers={"Authorization": f"token {server.token}"}
        )
        assert b"nbclassic" in page.body or b"Jupyter Notebook" in page.body
        specs = await server.request("GET", "/api/kernelspecs")
        assert "remote" in specs["kernelspecs"]
        await lifecycle(server)
    finally:
        server.stop()


async def lifecycle(server: Server) -> None:
    """Sessions, websocket execute (stream, display, result, input), interrupt, restart,
    delete."""
    session = await server.request(
        "POST", "/api/sessions",
        {"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "remote"}},
    )  # fmt: skip
    kernel_id = session["kernel"]["id"]
    kernels = await server.request("GET", "/api/kernels")
    assert [k["id"] for k in kernels] == [kernel_id]
    assert kernels[0]["execution_state"] in ("starting", "idle", "busy")
    channels = await server.channels(kernel_id)
    try:
        await iopub_connected(channels)
        code = (
            "import os, socket\n"
            "from IPython.display import HTML, display\n"
            "print('ssh:', os.environ['SSH_CONNECTION'].split()[2])\n"
            "display(HTML('<b>rich</b>'))\n"
            "6 * 7"
        )
        messages = await channels.collect(channels.execute(code))
        kinds = {m["msg_type"]: m["content"] for m in messages}
        assert kinds["stream"]["text"] == "ssh: 127.0.0.2\n"
        assert kinds["display_data"]["data"]["text/html"] == "<b>rich</b>"
        assert kinds["execute_result"]["data"]["text/plain"] == "42"
        before = (await server.request("GET", f"/api/kernels/{kernel_id}"))["last_activity"]

        # input() over the stdin channel
        msg_id = channels.execute("name = input('who? ')\nprint('hi', name)", allow_stdin=True)
        while (request := await channels.receive())["msg_type"] != "input_request":
            pass
        assert request["content"]["prompt"] == "who? "
        channels.send("stdin", "input_reply", {"value": "ada"}, parent=request["header"])
        messages = await channels.collect(msg_id)
        assert any(m["content"].get("text") == "hi ada\n" for m in messages)
        after = (await server.request("GET", f"/api/kernels/{kernel_id}"))["last_activity"]
        assert after > before

        # interrupt a long cell through the REST API
        msg_id = channels.execute(SLEEPING_CELL)
        while not (  # the cell runs (a SIGINT before that can be lost by ipykernel)
            (m := await channels.receive())["msg_type"] == "stream"
            and m["parent_header"].get("msg_id") == msg_id
        ):
            pass
        started = time.monotonic()
        await server.request("POST", f"/api/kernels/{kernel_id}/interrupt")
        messages = await channels.collect(msg_id, timeout=10)
        reply = next(m for m in messages if m["msg_type"] == "execute_reply")
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 2

        # restart: answers once the new kernel replies; a new remote process
        old_pid = await kernel_pid(channels)
        await server.request("POST", f"/api/kernels/{kernel_id}/restart")
        assert not process_alive(old_pid)
        await iopub_connected(channels)
        new_pid = await kernel_pid(channels)
        assert new_pid != old_pid
    finally:
        channels.close()
    await server.request("DELETE", f"/api/sessions/{session['id']}")
    assert await server.request("GET", "/api/kernels") == []
    await wait_until(lambda: not process_alive(new_pid), 10, "the kernel to stop")


async def test_websocket_reconnect_replays_buffered_output(server: Server) -> None:
    kernel = await server.request("POST", "/api/kernels", {"name": "remote"})
    channels = await server.channels(kernel["id"])
    session = channels.session
    await channels.collect(channels.execute("pass"))
    msg_id = channels.execute(
        "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)"
    )
    while (message := await channels.receive())["msg_type"] != "stream":
        pass
    assert message["content"]["text"] == "0\n"
    channels.close()  # away while the cell goes on printing
    deadline = time.monotonic() + 30  # the cell runs to its end with nobody listening
    while (await server.request("GET", f"/api/kernels/{kernel['id']}"))[
        "execution_state"
    ] != "idle":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    channels = await server.channels(kernel["id"], session_id=session)
    try:
        messages = await channels.collect(msg_id)
        printed = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
        assert printed == "1\n2\n"  # buffered while away, replayed on reconnect
    finally:
        channels.close()
    await server.request("DELETE", f"/api/kernels/{kernel['id']}")


async def test_a_cut_link_loses_no_output_on_the_websocket(
    tmp_path: Path, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    """The link to the host is cut for 12 s after a cell's first line: the browser's
    websocket gets every line the cell printed meanwhile, its reply and its idle."""
    from ..kit import COUNTING_CELL, LINES, OUTAGE, resilient

    link, config = host_behind_a_link
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "behind-a-link", resilient(config))
    server = start_server(tmp_path, path)
    try:
        kernel = await server.request("POST", "/api/kernels", {"name": "behind-a-link"})
        channels = await server.channels(kernel["id"])
        try:
            await channels.collect(channels.execute("pass"))
            msg_id = channels.execute(COUNTING_CELL)
            while not (
                (m := await channels.receive())["msg_type"] == "stream"
                and m["parent_header"].get("msg_id") == msg_id
            ):
                pass
            link.down()
            await asyncio.sleep(OUTAGE)  # the provisioner notices in ~4 s (keepalives)
            link.up()
            messages = [m, *await channels.collect(msg_id, timeout=60)]
        finally:
            channels.close()
        printed = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
        assert printed.split() == [str(i) for i in range(LINES)]
        reply = next(m for m in messages if m["msg_type"] == "execute_reply")
        assert reply["content"]["status"] == "ok"
        assert "SSH connection lost" in server.log()  # it was a real outage
        await server.request("DELETE", f"/api/kernels/{kernel['id']}")
    finally:
        server.stop()


async def start_busy_cell(server: Server, kernel_id: str, seconds: float) -> int:
    """Start a sleeping cell and disconnect (connected kernels are never culled, busy or
    not, unless cull_connected): returns the kernel's pid on the host."""
    channels = await server.channels(kernel_id)
    try:
        pid = await kernel_pid(channels)
        msg_id = channels.execute(f"import time; print('busy', flush=True); time.sleep({seconds})")
        while not (
            (m := await channels.receive())["msg_type"] == "stream"
            and m["parent_header"].get("msg_id") == msg_id
        ):
            pass
    finally:
        channels.close()
    state = (await server.request("GET", f"/api/kernels/{kernel_id}"))["execution_state"]
    assert state == "busy"
    return pid


async def kernel_gone_from_host(server: Server, kernel_id: str, pid: int) -> None:
    deadline = time.monotonic() + 20
    while kernel_id in [k["id"] for k in await server.request("GET", "/api/kernels")]:
        assert time.monotonic() < deadline, f"kernel {kernel_id} was not culled"
        await asyncio.sleep(0.2)
    await wait_until(lambda: not process_alive(pid), 10, "the culled kernel to stop")


async def test_idle_kernels_are_culled_busy_ones_are_not(
    tmp_path: Path, jupyter_path: Path
) -> None:
    server = start_server(
        tmp_path, jupyter_path,
        "--MappingKernelManager.cull_idle_timeout=3", "--MappingKernelManager.cull_interval=1",
    )  # fmt: skip
    try:
        idle = await server.request("POST", "/api/kernels", {"name": "remote"})
        busy = await server.request("POST", "/api/kernels", {"name": "remote"})
        idle_channels = await server.channels(idle["id"])
        idle_pid = await kernel_pid(idle_channels)
        idle_channels.close()
        pid = await start_busy_cell(server, busy["id"], seconds=8)
        await kernel_gone_from_host(server, idle["id"], idle_pid)
        assert busy["id"] in [k["id"] for k in await server.request("GET", "/api/kernels")]
        assert process_alive(pid)
        await server.request("DELETE", f"/api/kernels/{busy['id']}")
    finally:
        server.stop()


async def test_cull_busy_culls_a_busy_kernel(tmp_path: Path, jupyter_path: Path) -> None:
    server = start_server(
        tmp_path, jupyter_path,
        "--MappingKernelManager.cull_idle_timeout=3", "--MappingKernelManager.cull_interval=1",
        "--MappingKernelManager.cull_busy=True",
    )  # fmt: skip
    try:
        busy = await server.request("POST", "/api/kernels", {"name": "remote"})
        pid = await start_busy_cell(server, busy["id"], seconds=60)
        await kernel_gone_from_host(server, busy["id"], pid)
    finally:
        server.stop()
    assert "Culling 'busy' kernel" in server.log()


async def test_curve_through_jupyter_server(tmp_path: Path, host_config: dict[str, Any]) -> None:
    """--MappingKernelManager.transport_encryption=required: the server's own channels
    (websocket, nudge, activity) speak CURVE to the remote kernel."""
    path = tmp_path / "share" / "jupyter"
    write_kernelspec(path, "curve", host_config, supported_encryption=["curve"])
    server = start_server(tmp_path, path, "--MappingKernelManager.transport_encryption=required")
    try:
        kernel = await server.request("POST", "/api/kernels", {"name": "curve"})
        channels = await server.channels(kernel["id"])
        code = (
            "from ipykernel.kernelapp import IPKernelApp as A\n"
            "bool(A.instance().shell_socket.curve_server)"
        )
        try:
            messages = await channels.collect(channels.execute(code))
        finally:
            channels.close()
        result = next(m for m in messages if m["msg_type"] == "execute_result")
        assert result["content"]["data"]["text/plain"] == "True"
        await server.request("DELETE", f"/api/kernels/{kernel['id']}")
    finally:
        server.stop()


async def test_server_shutdown_stops_every_remote_kernel(
    tmp_path: Path, jupyter_path: Path
) -> None:
    server = start_server(tmp_path, jupyter_path)
    try:
        for _ in range(2):
            await server.request("POST", "/api/kernels", {"name": "remote"})
        assert len(remote_leftovers()["runtime_dirs"]) >= 2
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0
    assert "Shutting down 2 kernel" in server.log()


async def test_pinning_through_the_api_by_kernelspec(
    tmp_path: Path, trio_config: dict[str, Any]
) -> None:
    """Jupyter Server's REST API passes no client env (KERNEL_SSH_HOST cannot travel), so
    a pinned host is a kernelspec of its own: `ssh-provisioner install NAME --host H`."""
    path = tmp_path / "share" / "jupyter"
    for index, host in enumerate(trio_config["hosts"]):
        write_kernelspec(path, f"on-{index}", {**trio_config, "hosts": [host]})
    server = start_server(tmp_path, path)
    try:
        for index, expected in ((2, "host-c"), (1, "host-b")):
            kernel = await server.request("POST", "/api/kernels", {"name": f"on-{index}"})
            channels = await server.channels(kernel["id"])
            code = "import socket; print(socket.gethostname())"
            messages = await channels.collect(channels.execute(code))
            channels.close()
            printed = next(m for m in messages if m["msg_type"] == "stream")["content"]["text"]
            assert printed.strip() == expected
            await server.request("DELETE", f"/api/kernels/{kernel['id']}")
    finally:
        server.stop()


async def test_nbclient_runs_a_notebook(
    tmp_path: Path, jupyter_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cells = [
        "import os, socket\nprint(socket.gethostname(), 'SSH_CONNECTION' in os.environ)",
        "from IPython.display import Markdown\nMarkdown('**remote**')",
        "1 / 0",
        "import time\ntime.sleep(1.5)\nsum(range(10))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))  # as a user's installed kernelspec
    client = NotebookClient(nb, kernel_name="remote", allow_errors=True, timeout=60)
    await client.async_execute()
    saved = tmp_path / "out.ipynb"
    nbformat.write(nb, saved)
    outputs = [cell["outputs"] for cell in nbformat.read(saved, as_version=4).cells]
    assert outputs[0][0]["text"].endswith("True\n")
    assert outputs[1][0]["data"]["text/markdown"] == "**remote**"
    assert outputs[2][0]["ename"] == "ZeroDivisionError"
    assert outputs[3][0]["data"]["text/plain"] == "45"
    assert sys.platform.startswith("linux")


async def test_a_start_that_fails_tells_the_user_which_host_and_why(
    tmp_path: Path, host_config: dict[str, Any]
) -> None:
    """What JupyterLab shows in its "Error Starting Kernel" dialog: the REST error's
    message, naming the host and the cause."""
    from tornado.httpclient import HTTPClientError

    path = tmp_path / "share" / "jupyter"
    closed = f"root@127.0.0.2:{free_port('127.0.0.2')}"  # nothing listens there
    write_kernelspec(path, "down", {**host_config, "hosts": [closed]})
    server = start_server(tmp_path, path)
    try:
        with pytest.raises(HTTPClientError) as failed:
            await server.request(
                "POST", "/api/sessions",
                {"path": "nb.ipynb", "type": "notebook", "kernel": {"name": "down"}},
            )  # fmt: skip
        assert failed.value.response is not None
        message = json.loads(failed.value.response.body)["message"]
        assert closed in message
        assert "refused" in message
        assert await server.request("GET", "/api/kernels") == []
    finally:
        server.stop()
