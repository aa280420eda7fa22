"""Nothing is lost across a blip: output and replies the kernel produces while its host
is unreachable are kept by the relay on the host, and delivered in order once the link
is back, to a plain client and to nbclient alike (no nudges)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from ..conftest import KernelSpecFactory
from ..helpers import execute, wait_until
from ..kit import (
    COUNTING_CELL,
    LINES,
    OUTAGE,
    VENV_BIN,
    Message,
    cli_env,
    counting_cell,
    cut_for,
    follow,
    host_python,
    idle,
    printed_line,
    printing,
    resilient,
    running_kernel,
)
from ..netns import Link

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


@pytest.mark.parametrize(
    ("interval", "cut_after_line", "outage"),
    [
        (0.1, 50, 10.0),  # a line every 100 ms for 20 s, the link down 10 s in the middle
        (0.05, 0, OUTAGE),  # the cell, its idle and its reply all end during the cut
    ],
)
async def test_output_and_reply_sent_during_a_cut_all_arrive_in_order(
    make_kernelspec: KernelSpecFactory,
    host_behind_a_link: tuple[Link, dict[str, Any]],
    interval: float,
    cut_after_line: int,
    outage: float,
) -> None:
    link, config = host_behind_a_link
    async with running_kernel(make_kernelspec, resilient(config)) as (km, kc):
        msg_id = kc.execute(counting_cell(interval))
        messages: list[Message] = []
        await follow(kc, msg_id, messages, printed_line(cut_after_line))
        await cut_for(link, km, outage)
        await follow(kc, msg_id, messages, idle)
        printed = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
        assert printed.split() == [str(i) for i in range(LINES)]  # all of them, in order
        assert [m["msg_type"] for m in messages][:2] == ["status", "execute_input"]
        reply = await kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"
        out, _ = await execute(kc, "print('after', i)")
        assert out.strip() == f"after {LINES - 1}"


async def test_nbclient_gets_the_whole_cell_across_a_cut(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    link, config = host_behind_a_link
    ksm, name = make_kernelspec(resilient(config))
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("print('first cell')"),
        nbformat.v4.new_code_cell(COUNTING_CELL),
        nbformat.v4.new_code_cell("print('last cell', i)"),
    ]
    client = NotebookClient(notebook, km=km, timeout=120, kernel_name=name)
    run = asyncio.ensure_future(client.async_execute())
    try:
        await wait_until(
            lambda: bool(notebook.cells[1].get("outputs")), 60, "the counting cell's output"
        )
        await cut_for(link, km, OUTAGE)
        await asyncio.wait_for(run, 90)
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        if client.kc is not None:  # nbclient leaves a manager it did not make to us
            client.kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel()
    counted = "".join(output.get("text", "") for output in notebook.cells[1].outputs)
    assert counted.split() == [str(i) for i in range(LINES)]
    assert notebook.cells[2].outputs[0]["text"] == f"last cell {LINES - 1}\n"


def test_papermill_completes_across_a_cut(
    make_kernelspec: KernelSpecFactory,
    host_behind_a_link: tuple[Link, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """papermill, as a process, runs a notebook whose cell is cut off mid-way: it
    completes, and its output notebook has every line."""
    link, config = host_behind_a_link
    ksm, name = make_kernelspec(resilient(config))
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": name, "display_name": name, "language": "python"}
    notebook.cells = [
        nbformat.v4.new_code_cell(COUNTING_CELL),
        nbformat.v4.new_code_cell("print('last cell', i)"),
    ]
    source, target = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(notebook, source)
    argv = [f"{VENV_BIN}/papermill", str(source), str(target), "-k", name, "--log-output"]
    process = subprocess.Popen(
        argv, env=cli_env(ksm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        log = ""
        deadline = time.monotonic() + 60
        while not any(line.strip() == "0" for line in log.splitlines()):
            assert time.monotonic() < deadline, log
            log += process.stdout.readline()  # papermill logs the cell's output as it comes
        link.down()
        time.sleep(OUTAGE)  # the provisioner runs in papermill; this test only waits
        link.up()
        rest, _ = process.communicate(timeout=120)
        assert process.returncode == 0, log + rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    result = nbformat.read(target, as_version=4)
    counted = "".join(output.get("text", "") for output in result.cells[0].outputs)
    assert counted.split() == [str(i) for i in range(LINES)]
    assert result.cells[1].outputs[0]["text"] == f"last cell {LINES - 1}\n"


FLOOD_LINES = 2000
FLOOD_CELL = (
    "import time\n"
    f"for i in range({FLOOD_LINES}):\n"
    "    print(str(i).rjust(8, '.') * 1024, flush=True)\n"  # 8 KiB a line, 16 MiB in all
    "    time.sleep(0.004)\n"
    "print('done', flush=True)\n"
)


async def test_past_the_outage_buffer_the_user_is_told_what_was_dropped(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    """With the smallest outage buffer (4 MiB), a cell printing 16 MiB during a cut
    loses lines; its output says how many, in the cell that lost them, and the kernel
    goes on."""
    link, config = host_behind_a_link
    settings = resilient(config, outage_buffer=4 * 1024 * 1024)
    async with running_kernel(make_kernelspec, settings) as (km, kc):
        msg_id = kc.execute(FLOOD_CELL)
        messages: list[Message] = []
        await follow(kc, msg_id, messages, printing)
        await cut_for(link, km, OUTAGE)
        await follow(kc, msg_id, messages, idle)
        texts = [m["content"]["text"] for m in messages if m["msg_type"] == "stream"]
        notices = [t for t in texts if "[ssh-provisioner]" in t]
        assert len(notices) == 1, texts[-5:]
        assert "were dropped while the link to this kernel's host was down" in notices[0]
        lines = [line for t in texts if t not in notices for line in t.split()]
        numbers = [int(line.rsplit(".", 1)[-1]) for line in lines if line != "done"]
        assert numbers == sorted(numbers)  # what arrived is in order, with a gap
        assert numbers[:1] == [0]
        assert len(numbers) < FLOOD_LINES
        # The newest output is what is dropped (as a ZMQ socket past its high-water
        # mark would): the notice comes in the cell, before its `idle`.
        assert messages[-1]["msg_type"] == "status"
        reply = await kc.get_shell_msg(timeout=10)
        assert reply["content"]["status"] == "ok"
        out, _ = await execute(kc, "print('still here')")
        assert out.strip() == "still here"


async def test_the_relay_on_the_oldest_host_python(
    make_kernelspec: KernelSpecFactory, host_behind_a_link: tuple[Link, dict[str, Any]]
) -> None:
    """The relay runs in the launcher, on the host's Python: on 3.6, with ipc (its
    socket in the runtime dir), a cut loses nothing either."""
    link, config = host_behind_a_link
    python, site = host_python("3.6")
    settings = resilient(config, remote_python=python, remote_transport="ipc")
    async with running_kernel(make_kernelspec, settings, env={"PYTHONPATH": str(site)}) as (
        km,
        kc,
    ):
        out, _ = await execute(kc, "import sys; print(sys.version_info[:2])")
        assert out.strip() == "(3, 6)"
        msg_id = kc.execute(COUNTING_CELL)
        messages: list[Message] = []
        await follow(kc, msg_id, messages, printing)
        await cut_for(link, km, OUTAGE)
        await follow(kc, msg_id, messages, idle)
        lines = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
        assert lines.split() == [str(i) for i in range(LINES)]
