"""Kernels survive a lost SSH connection: the provisioner reconnects and reattaches to
the launcher, reopening the forwards on the same local ports."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import KernelSpecFactory, connect_options
from ..helpers import execute, process_alive, wait_until
from ..sshd import SSHDaemon, start_sshd
from .test_lifecycle import running_kernel

pytestmark = [pytest.mark.sshd, pytest.mark.usefixtures("no_leaks")]


@pytest.fixture
def flaky_host(tmp_path: Path, client_key: tuple[Path, str]) -> Iterator[SSHDaemon]:
    daemon = start_sshd(tmp_path / "flaky", "127.0.0.9", client_key[1] + "\n")
    yield daemon
    daemon.stop()


@pytest.fixture
def flaky_config(flaky_host: SSHDaemon, client_key: tuple[Path, str]) -> dict[str, Any]:
    return {
        "hosts": [flaky_host.destination("root")],
        "connect_options": connect_options(flaky_host, client_key[0]),
        "remote_python": sys.executable,
        "orphan_timeout": 60.0,
        "reconnect_timeout": 30.0,
    }


async def test_a_running_cell_survives_an_sshd_restart(
    make_kernelspec: KernelSpecFactory, flaky_config: dict[str, Any], flaky_host: SSHDaemon
) -> None:
    async with running_kernel(make_kernelspec, flaky_config) as (km, kc):
        await execute(kc, "x = 42")
        ports = dict(km.get_connection_info())
        pid = (await km.provisioner.get_provisioner_info())["pid"]
        msg_id = kc.execute("import time; time.sleep(3); print(x + 1)")
        while not (  # the kernel has the request (in-flight messages die with a link)
            (message := await kc.get_iopub_msg(timeout=10))["msg_type"] == "status"
            and message["parent_header"].get("msg_id") == msg_id
        ):
            pass
        flaky_host.stop()  # every connection of the host dies with its sshd
        lease = km.provisioner._lease
        await wait_until(lambda: lease.connection.is_closed(), 10, "the lost connection")
        assert await km.provisioner.poll() is None  # unreachable, not dead
        assert process_alive(pid)
        flaky_host.start()
        deadline = time.monotonic() + 30
        printed = ""
        while True:  # the cell's output arrives once reattached
            message = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                printed += message["content"]["text"]
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                break
        assert printed == "43\n"
        assert dict(km.get_connection_info()) == ports  # same local ports
        out, _ = await execute(kc, "print(x)")
        assert out.strip() == "42"
        assert (await km.provisioner.get_provisioner_info())["pid"] == pid


async def test_an_unreachable_kernel_counts_as_dead_then_is_reaped(
    make_kernelspec: KernelSpecFactory, flaky_config: dict[str, Any], flaky_host: SSHDaemon
) -> None:
    config = {**flaky_config, "reconnect_timeout": 1.5, "orphan_timeout": 2.0}
    async with running_kernel(make_kernelspec, config) as (km, _):
        pid = (await km.provisioner.get_provisioner_info())["pid"]
        flaky_host.stop()
        started = time.monotonic()
        status = await asyncio.wait_for(km.provisioner.wait(), 20)
        assert status == 255
        assert time.monotonic() - started >= 1.0  # it tried to reconnect first
        # the launcher kills its orphan after orphan_timeout: nothing is left on the host
        await wait_until(lambda: not process_alive(pid), 15, "the orphaned kernel to be killed")
