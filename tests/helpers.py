"""Observations of the host side and the local side, and kernel client helpers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

# A cell to interrupt, and the sign that it runs: "sleeping" on stdout, printed by a
# timer thread once the main thread sleeps.  Not print(flush=True) before the sleep: the
# flush makes the main thread wait for ipykernel's IOPub thread, the client can see the
# output while it still waits, and a SIGINT landing there was lost (the cell ran on)
# about once in 1,200 interrupts, with a local kernel as with a remote one; with the
# timer, none in 2,400 (README: "Interrupts").
SLEEPING_CELL = (
    "import threading, time\n"
    "threading.Timer(0.05, print, args=('sleeping',), kwargs={'flush': True}).start()\n"
    "time.sleep(60)"
)


def process_alive(pid: int) -> bool:
    """True for a live process; a zombie counts as dead (`kill -0` would say alive)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "zombie" not in state and "Z" not in state.split()[1:2]


def process_group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def tcp_listeners() -> set[tuple[str, int]]:
    """Every TCP socket in LISTEN state on this machine, as (hex address, port)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                address, port = fields[1].split(":")
                found.add((address, int(port, 16)))
    return found


def listening_ports() -> set[int]:
    return {port for _, port in tcp_listeners()}


def cmdlines_containing(needle: bytes) -> list[int]:
    hits = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                hits.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return hits


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def execute(
    kc: AsyncKernelClient, code: str, timeout: float = 30.0, stdin_reply: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Run ``code``; return (stdout text, execute_reply content)."""
    chunks: list[str] = []

    def on_output(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            chunks.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, output_hook=on_output, timeout=timeout)
    return "".join(chunks), reply["content"]


async def past_the_error(kc: AsyncKernelClient, msg_id: str) -> None:
    """Wait until the kernel is done with the request ``msg_id`` that failed.

    ipykernel aborts an execute_request that reaches it before it has finished with an
    error it already replied to (ipython/ipykernel#609; a local kernel does the same, and
    a busy machine widens the window: docs/how-it-works.md, "Interrupts and the next
    cell"). It publishes the request's idle status only after that, and a next cell sent
    then is run, as nbclient and JupyterLab send it."""

    async def idle() -> None:
        while not (
            (m := await kc.get_iopub_msg(timeout=10))["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == msg_id
            and m["content"]["execution_state"] == "idle"
        ):
            pass

    await asyncio.wait_for(idle(), 10)


async def interrupt_a_running_cell(
    km: AsyncKernelManager, kc: AsyncKernelClient, cell: str = SLEEPING_CELL
) -> str:
    """Run ``cell``, interrupt it once it prints, expect KeyboardInterrupt; its msg_id."""
    msg_id = kc.execute(cell)
    while not (
        (m := await kc.get_iopub_msg(timeout=30))["msg_type"] == "stream"
        and m["parent_header"].get("msg_id") == msg_id
    ):
        pass
    await km.interrupt_kernel()
    # the cell's own reply: a busy machine can leave wait_for_ready's extra kernel_info
    # replies in the queue before it
    while (reply := await kc.get_shell_msg(timeout=10))["parent_header"].get("msg_id") != msg_id:
        pass
    assert reply["content"].get("ename") == "KeyboardInterrupt", reply["content"]
    await past_the_error(kc, msg_id)
    return msg_id


async def start_failing(
    make_kernelspec: Callable[..., tuple[KernelSpecManager, str]],
    config: dict[str, Any],
    error: type[BaseException],
    *,
    env: dict[str, str] | None = None,
    **spec: Any,
) -> str:
    """Start a kernel that must fail with ``error``; return the message. Checks that the
    failed start left no local connection file behind."""
    ksm, name = make_kernelspec(config, **spec)
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    try:
        with pytest.raises(error) as raised:
            await (km.start_kernel(env=env) if env is not None else km.start_kernel())
    finally:
        await km.cleanup_resources()
    assert not km.connection_file or not Path(km.connection_file).exists()
    return str(raised.value)
